//! Quantizing a loaded model in memory: every block linear layer is replaced by the method's
//! stored form, computed from its full-precision weight (and, for calibrated methods, the
//! statistics of its input).

use anyq_models::{LinearInput, LlamaModel, LINEAR_MODULES};
use anyq_quant::methods::mixq::{MixQLinear, OutlierStats};
use anyq_quant::methods::{LayerToQuantize, MethodError, QuantMethod};

use crate::calibrate::CalibrationStats;

/// The activation that a block's linear module reads.
fn input_of(module: &str) -> LinearInput {
    LinearInput::ALL.into_iter().find(|i| i.consumers().contains(&module)).expect("every linear module reads an input")
}

/// Replaces every block linear layer of `model` by `method`'s quantized form.
/// `progress(done, total)` follows the layers.
pub fn quantize_model(
    model: &mut LlamaModel,
    method: &dyn QuantMethod,
    stats: Option<&CalibrationStats>,
    progress: &dyn Fn(usize, usize),
) -> Result<(), MethodError> {
    if method.needs_calibration() && stats.is_none() {
        return Err(MethodError::NeedsCalibration(method.name()));
    }
    let layers = model.config.num_layers;
    for layer in 0..layers {
        for module in LINEAR_MODULES {
            let old = model.linear(layer, module).expect("LINEAR_MODULES name every block layer");
            let weight = old.dense_weight();
            let quantized = method.quantize(&LayerToQuantize {
                weight: &weight,
                bias: old.bias(),
                out_features: old.out_features(),
                in_features: old.in_features(),
                input_stats: stats.and_then(|s| s.get(layer, input_of(module))),
            })?;
            model.replace_linear(layer, module, quantized).expect("a method keeps the layer's shape");
        }
        progress(layer + 1, layers);
    }
    Ok(())
}

/// MixQ's outlier counters of every block linear layer that is a MixQ layer: (layer, module,
/// counters). Empty for other methods.
pub fn outlier_report(model: &LlamaModel) -> Vec<(usize, &'static str, OutlierStats)> {
    let mut report = Vec::new();
    for layer in 0..model.config.num_layers {
        for module in LINEAR_MODULES {
            let linear = model.linear(layer, module).expect("LINEAR_MODULES name every block layer");
            if let Some(mixq) = linear.as_any().downcast_ref::<MixQLinear>() {
                report.push((layer, module, mixq.outlier_stats()));
            }
        }
    }
    report
}
