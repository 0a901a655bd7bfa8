//! SmoothQuant W8A8: activation outliers are migrated into the weights with a per-input-channel
//! factor `s_j = max|X_j|^α / max|W_j|^(1−α)` (from calibration), so that both `X·diag(s)⁻¹`
//! and `diag(s)·W` quantize well to 8 bits; activations per token, weights per channel.

use anyq_core::Linear;

use super::act_quant::ActQuantLinear;
use super::{own_layer, LayerToQuantize, MethodError, QuantMethod};
use crate::layer_arrays::LayerArrays;

pub const SYNTAX: &str = "smoothquant-w8a8[-a{alpha}]";
const DEFAULT_ALPHA: f32 = 0.5;
/// Floor of both maxima: a channel that is zero everywhere gets a neutral factor.
const MIN_MAGNITUDE: f32 = 1e-5;

pub struct SmoothQuant {
    alpha: f32,
}

/// `smoothquant-w8a8` (α = 0.5, the paper's default for LLaMA-like models) or
/// `smoothquant-w8a8-a0.8`.
pub fn parse(name: &str) -> Result<Box<dyn QuantMethod>, MethodError> {
    let invalid = |message: String| MethodError::Invalid { name: name.to_string(), message };
    let rest = name.strip_prefix("smoothquant-w8a8").ok_or_else(|| invalid(format!("expected {SYNTAX}")))?;
    let alpha = match rest.strip_prefix("-a") {
        Some(a) => a.parse().map_err(|_| invalid(format!("alpha {a:?} is not a number")))?,
        None if rest.is_empty() => DEFAULT_ALPHA,
        None => return Err(invalid(format!("expected {SYNTAX}"))),
    };
    if !(0.0..=1.0).contains(&alpha) {
        return Err(invalid(format!("alpha {alpha} is outside [0, 1]")));
    }
    Ok(Box::new(SmoothQuant { alpha }))
}

/// `s_j = max|X_j|^α / max|W_j|^(1−α)`, with `max|W_j|` over the output channels.
pub fn smoothing_factors(act_abs_max: &[f32], w: &[f32], k: usize, alpha: f32) -> Vec<f32> {
    let mut w_abs_max = vec![0.0f32; k];
    for row in w.chunks_exact(k) {
        for (m, v) in w_abs_max.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    act_abs_max
        .iter()
        .zip(&w_abs_max)
        .map(|(&a, &w)| a.max(MIN_MAGNITUDE).powf(alpha) / w.max(MIN_MAGNITUDE).powf(1.0 - alpha))
        .collect()
}

impl QuantMethod for SmoothQuant {
    fn name(&self) -> String {
        if self.alpha == DEFAULT_ALPHA {
            "smoothquant-w8a8".into()
        } else {
            format!("smoothquant-w8a8-a{}", self.alpha)
        }
    }

    fn bits(&self) -> (u8, u8) {
        (8, 8)
    }

    fn needs_calibration(&self) -> bool {
        true
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<Box<dyn Linear>, MethodError> {
        let (n, k) = (layer.out_features, layer.in_features);
        let stats = layer.input_stats.ok_or_else(|| MethodError::NeedsCalibration(self.name()))?;
        if stats.channels() != k {
            return Err(MethodError::Invalid {
                name: self.name(),
                message: format!("calibration has {} channels for a layer of {k} inputs", stats.channels()),
            });
        }
        let s = smoothing_factors(stats.abs_max(), layer.weight, k, self.alpha);
        Ok(Box::new(ActQuantLinear::new(layer.weight, n, k, None, Some(&s), layer.bias)?))
    }

    fn save(&self, layer: &dyn Linear) -> Result<LayerArrays, MethodError> {
        Ok(own_layer::<ActQuantLinear>(self, layer)?.save())
    }

    fn load(&self, arrays: LayerArrays, n: usize, k: usize) -> Result<Box<dyn Linear>, MethodError> {
        Ok(Box::new(ActQuantLinear::load(arrays, n, k, None, true)?))
    }
}
