//! Quantization methods as plug-ins, one file each (vLLM's `LinearMethod` idea): a method turns
//! a full-precision weight (and the calibration statistics of its input) into its stored form,
//! which is an `anyq_core::Linear` that runs `y = x·Wᵀ (+ b)` from that form. Adding a method
//! is one file and one row in `METHODS`.

pub mod act_quant;
pub mod gptq;
pub mod int_weight;
pub mod mixq;
pub mod rtn;
pub mod smoothquant;

use anyq_core::Linear;

use crate::calibration::ChannelStats;
use crate::layer_arrays::{ArrayError, LayerArrays};
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
    #[error(transparent)]
    Arrays(#[from] ArrayError),
    #[error("method {method}: the layer was not made by this method")]
    ForeignLayer { method: String },
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
    /// Calibration must gather each input's `XᵀX` (GPTQ).
    fn needs_hessian(&self) -> bool {
        false
    }
    /// Weights are in groups of this many inputs (`None`: one scale per output channel).
    fn group_size(&self) -> Option<usize> {
        None
    }
    fn quantize(&self, layer: &LayerToQuantize) -> Result<Box<dyn Linear>, MethodError>;
    /// The arrays that store `layer`, a layer this method made (by `quantize` or `load`).
    fn save(&self, layer: &dyn Linear) -> Result<LayerArrays, MethodError>;
    /// The layer `[out_features, in_features]` back from the arrays `save` wrote, every array
    /// checked: a missing, extra or misshapen one is an error.
    fn load(
        &self,
        arrays: LayerArrays,
        out_features: usize,
        in_features: usize,
    ) -> Result<Box<dyn Linear>, MethodError>;
}

/// Stored scales must be usable: finite and positive.
fn check_scales(name: &str, scales: &[f32]) -> Result<(), ArrayError> {
    match scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        Some(s) => {
            Err(ArrayError::Invalid { name: name.into(), message: format!("scale {s} is not finite and positive") })
        }
        None => Ok(()),
    }
}

/// `layer` as the concrete type that `method` makes.
fn own_layer<'a, T: 'static>(method: &dyn QuantMethod, layer: &'a dyn Linear) -> Result<&'a T, MethodError> {
    layer.as_any().downcast_ref::<T>().ok_or_else(|| MethodError::ForeignLayer { method: method.name() })
}

/// A method family: its name prefix, the syntax of its parameters, and its parser.
struct MethodFamily {
    prefix: &'static str,
    syntax: &'static str,
    parse: fn(&str) -> Result<Box<dyn QuantMethod>, MethodError>,
}

const METHODS: &[MethodFamily] = &[
    MethodFamily { prefix: "rtn-", syntax: rtn::SYNTAX, parse: rtn::parse },
    MethodFamily { prefix: "gptq-", syntax: gptq::SYNTAX, parse: gptq::parse },
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
