//! Quantization methods as plug-ins, one file each (vLLM's `LinearMethod` idea): a method turns
//! a full-precision weight (and the calibration statistics of its input) into its stored form,
//! which is an `anyq_core::Linear` that runs `y = x·Wᵀ (+ b)` from that form. Adding a method
//! is one file and one row in `METHODS`.

pub mod act_quant;
pub mod mixq;
pub mod rtn;
pub mod smoothquant;

use anyq_core::Linear;

use crate::calibration::ChannelStats;
use crate::quantizer::QuantError;

/// One linear layer to quantize: its weight `[out_features, in_features]`, bias and, where the
/// method calibrates, statistics of the activations it reads.
pub struct LayerToQuantize<'a> {
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub out_features: usize,
    pub in_features: usize,
    pub input_stats: Option<&'a ChannelStats>,
}

#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    #[error("unknown quantization method {name:?} (known: {known})")]
    Unknown { name: String, known: String },
    #[error("method {name}: {message}")]
    Invalid { name: String, message: String },
    #[error("method {0} needs calibration statistics (--calib)")]
    NeedsCalibration(String),
    #[error(transparent)]
    Quant(#[from] QuantError),
}

/// A quantization method with its parameters, as named on the command line.
pub trait QuantMethod: Send + Sync {
    /// The name that selects it, e.g. `rtn-w4a16-g128`.
    fn name(&self) -> String;
    /// Bits of stored weights and of the activations the kernels multiply (16 = floating point).
    fn bits(&self) -> (u8, u8);
    fn needs_calibration(&self) -> bool {
        false
    }
    fn quantize(&self, layer: &LayerToQuantize) -> Result<Box<dyn Linear>, MethodError>;
}

/// A method family: its name prefix, the syntax of its parameters, and its parser.
struct MethodFamily {
    prefix: &'static str,
    syntax: &'static str,
    parse: fn(&str) -> Result<Box<dyn QuantMethod>, MethodError>,
}

const METHODS: &[MethodFamily] = &[
    MethodFamily { prefix: "rtn-", syntax: rtn::SYNTAX, parse: rtn::parse },
    MethodFamily { prefix: "smoothquant-", syntax: smoothquant::SYNTAX, parse: smoothquant::parse },
    MethodFamily { prefix: "mixq-", syntax: mixq::SYNTAX, parse: mixq::parse },
];

/// The method that `name` selects (`rtn-w4a16-g128`, ...).
pub fn method_by_name(name: &str) -> Result<Box<dyn QuantMethod>, MethodError> {
    match METHODS.iter().find(|f| name.starts_with(f.prefix)) {
        Some(family) => (family.parse)(name),
        None => Err(MethodError::Unknown {
            name: name.to_string(),
            known: METHODS.iter().map(|f| f.syntax).collect::<Vec<_>>().join(", "),
        }),
    }
}
