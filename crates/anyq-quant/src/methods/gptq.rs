//! GPTQ weight-only quantization (`crate::gptq`): the same stored format as RTN (packed
//! integers, per-group scales and zero points), with integers chosen to minimise each layer's
//! output error on the calibration inputs rather than each weight's own error.

use anyq_core::Linear;

use super::rtn::Rtn;
use super::{LayerToQuantize, MethodError, QuantMethod};
use crate::gptq::{gptq, GptqOptions};
use crate::layer_arrays::LayerArrays;
use crate::quantizer::{Granularity, QuantSpec};

pub const SYNTAX: &str = "gptq-w{2..8}a16[-g{group}]";

pub struct Gptq {
    /// The format the integers are stored in.
    rtn: Rtn,
}

/// `gptq-w4a16-g128`: 4-bit asymmetric weights in groups of 128 (AutoGPTQ's defaults); no `-g`
/// = one group per output channel.
pub fn parse(name: &str) -> Result<Box<dyn QuantMethod>, MethodError> {
    let invalid = |message: String| MethodError::Invalid { name: name.to_string(), message };
    let rest = name.strip_prefix("gptq-w").ok_or_else(|| invalid(format!("expected {SYNTAX}")))?;
    let (bits, rest) = rest.split_once("a16").ok_or_else(|| invalid(format!("expected {SYNTAX}")))?;
    let bits: u8 = bits.parse().map_err(|_| invalid("weight bits must be a number".into()))?;
    let granularity = match rest.strip_prefix("-g") {
        Some(g) => Granularity::PerGroup(g.parse().map_err(|_| invalid("group size must be a number".into()))?),
        None if rest.is_empty() => Granularity::PerChannel,
        None => return Err(invalid(format!("unknown option {rest:?}; expected {SYNTAX}"))),
    };
    let spec = QuantSpec::new(bits, false, granularity);
    spec.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(Box::new(Gptq { rtn: Rtn::with_spec(spec) }))
}

impl QuantMethod for Gptq {
    fn name(&self) -> String {
        self.rtn.name().replacen("rtn-", "gptq-", 1)
    }

    fn bits(&self) -> (u8, u8) {
        self.rtn.bits()
    }

    fn needs_calibration(&self) -> bool {
        true
    }

    fn needs_hessian(&self) -> bool {
        true
    }

    fn group_size(&self) -> Option<usize> {
        self.rtn.group_size()
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<Box<dyn Linear>, MethodError> {
        let (n, k) = (layer.out_features, layer.in_features);
        let hessian =
            layer.input_stats.and_then(|s| s.hessian()).ok_or_else(|| MethodError::NeedsCalibration(self.name()))?;
        let result = gptq(layer.weight, n, k, hessian, self.rtn.spec(), GptqOptions::default(), &[])
            .map_err(|e| MethodError::Invalid { name: self.name(), message: e.to_string() })?;
        Ok(Box::new(self.rtn.layer_of(result.quantized, layer.bias)))
    }

    fn save(&self, layer: &dyn Linear) -> Result<LayerArrays, MethodError> {
        self.rtn.save(layer)
    }

    fn load(&self, arrays: LayerArrays, n: usize, k: usize) -> Result<Box<dyn Linear>, MethodError> {
        self.rtn.load(arrays, n, k)
    }
}
