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
    /// Whether the inputs' `XᵀX` is gathered too (GPTQ).
    pub hessians: bool,
}

impl ActivationObserver for CalibrationStats {
    fn observe(&mut self, layer: usize, input: LinearInput, x: &[f32], cols: usize) {
        let hessians = self.hessians;
        let new = || if hessians { ChannelStats::with_hessian(cols) } else { ChannelStats::new(cols) };
        self.inputs.entry((layer, input)).or_insert_with(new).update(x);
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
    calibrate_with(model, ids, window, max_windows, false, progress)
}

/// `calibrate`, gathering each input's `XᵀX` too when `hessians` (for GPTQ; `k²` values per
/// input and a `k²·tokens` product per window).
pub fn calibrate_with(
    model: &LlamaModel,
    ids: &[u32],
    window: usize,
    max_windows: usize,
    hessians: bool,
    progress: &dyn Fn(usize, usize),
) -> Result<CalibrationStats, ForwardError> {
    let mut stats = CalibrationStats { hessians, ..Default::default() };
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
