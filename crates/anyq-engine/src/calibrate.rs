//! Calibration: run the full-precision model on calibration text and gather, for every linear
//! layer's input, per-channel activation statistics.

use std::collections::BTreeMap;

use anyq_models::{ActivationObserver, ForwardError, LinearInput, LlamaModel};
use anyq_quant::calibration::ChannelStats;

/// Statistics of each (layer, linear input) over all calibration tokens.
#[derive(Clone, Debug, Default)]
pub struct CalibrationStats {
    pub inputs: BTreeMap<(usize, LinearInput), ChannelStats>,
    pub tokens: usize,
}

impl ActivationObserver for CalibrationStats {
    fn observe(&mut self, layer: usize, input: LinearInput, x: &[f32], cols: usize) {
        self.inputs.entry((layer, input)).or_insert_with(|| ChannelStats::new(cols)).update(x);
    }
}

impl CalibrationStats {
    pub fn get(&self, layer: usize, input: LinearInput) -> Option<&ChannelStats> {
        self.inputs.get(&(layer, input))
    }
}

/// Runs up to `max_windows` non-overlapping windows of `window` tokens of `ids` (each from an
/// empty cache, like evaluation) and gathers their statistics. `progress(done, total)` follows.
pub fn calibrate(
    model: &LlamaModel,
    ids: &[u32],
    window: usize,
    max_windows: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<CalibrationStats, ForwardError> {
    let mut stats = CalibrationStats::default();
    let windows: Vec<&[u32]> = ids.chunks_exact(window.max(1)).take(max_windows).collect();
    if windows.is_empty() {
        return Err(ForwardError::Empty);
    }
    for (i, tokens) in windows.iter().enumerate() {
        model.forward_observed(tokens, &mut model.new_cache(), Some(&mut stats))?;
        stats.tokens += tokens.len();
        progress(i + 1, windows.len());
    }
    Ok(stats)
}
