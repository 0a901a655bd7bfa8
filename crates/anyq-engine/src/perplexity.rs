//! Perplexity by the WikiText-2 protocol: the text is tokenized once, cut into non-overlapping
//! windows of `ctx` tokens, each window is run alone, and every token after the first of a
//! window is predicted from those before it. ppl = exp(mean NLL over all predicted tokens).

use anyq_models::cuda::CudaModelError;
use anyq_models::{CpuDecoder, Decoder, ForwardError, LlamaModel};

#[derive(Clone, Debug)]
pub struct PerplexityReport {
    pub ppl: f64,
    pub mean_nll: f64,
    pub nll_per_window: Vec<f64>,
    /// Tokens predicted (ctx − 1 per window).
    pub tokens_predicted: usize,
    pub ctx: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("the text has {tokens} tokens: not enough for one window of {ctx}")]
    TooShort { tokens: usize, ctx: usize },
    #[error("context {0} must be at least 2 tokens")]
    ContextTooSmall(usize),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Gpu(#[from] CudaModelError),
}

/// Evaluates the first `max_windows` windows (all when `None`). `progress(done, total)` is called
/// after each window.
pub fn perplexity(
    model: &LlamaModel,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    progress: &dyn Fn(usize, usize),
) -> Result<PerplexityReport, PerplexityError> {
    perplexity_with(&mut CpuDecoder::new(model), ids, ctx, max_windows, progress)
}

/// [`perplexity`] on any device; `decoder` is cleared before each window.
pub fn perplexity_with<D: Decoder>(
    decoder: &mut D,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    progress: &dyn Fn(usize, usize),
) -> Result<PerplexityReport, PerplexityError>
where
    PerplexityError: From<D::Error>,
{
    if ctx < 2 {
        return Err(PerplexityError::ContextTooSmall(ctx));
    }
    let available = ids.len() / ctx;
    let windows = max_windows.map_or(available, |m| m.min(available));
    if windows == 0 {
        return Err(PerplexityError::TooShort { tokens: ids.len(), ctx });
    }
    let mut nll_per_window = Vec::with_capacity(windows);
    for (w, window) in ids.chunks_exact(ctx).take(windows).enumerate() {
        decoder.clear();
        let mut window_nll = 0.0f64;
        // Position i predicts token i + 1; the last position predicts nothing in this window.
        decoder.forward_all(window, &mut |i, logits| {
            if let Some(&next) = window.get(i + 1) {
                window_nll += negative_log_likelihood(logits, next as usize);
            }
        })?;
        nll_per_window.push(window_nll / (ctx - 1) as f64);
        progress(w + 1, windows);
    }
    let mean_nll = nll_per_window.iter().sum::<f64>() / windows as f64;
    Ok(PerplexityReport { ppl: mean_nll.exp(), mean_nll, nll_per_window, tokens_predicted: windows * (ctx - 1), ctx })
}

/// `−log softmax(logits)[target]`, in f64 so that summing thousands of them loses nothing.
fn negative_log_likelihood(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    max + log_sum - logits[target] as f64
}

#[cfg(test)]
mod tests {
    use super::negative_log_likelihood;

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let nll = negative_log_likelihood(&[3.0; 1000], 17);
        assert!((nll - (1000f64).ln()).abs() < 1e-9);
        // A huge logit on the target makes it certain, without overflow.
        assert!(negative_log_likelihood(&[0.0, 1e4, 0.0], 1).abs() < 1e-9);
    }
}
