//! Activation statistics gathered on calibration text: what SmoothQuant's smoothing factors,
//! MixQ's outlier channels and AWQ's scales are computed from, and GPTQ's Hessian.

use anyq_core::cpu::{matmul_xwt, transpose};

/// Per-input-channel statistics of the activations `[tokens, channels]` that one linear layer
/// reads, and optionally their second moments `XᵀX` (GPTQ's Hessian).
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    abs_max: Vec<f32>,
    abs_sum: Vec<f64>,
    tokens: u64,
    /// `[channels, channels]`, Σ over tokens of `x·xᵀ`.
    hessian: Option<Vec<f64>>,
}

impl ChannelStats {
    pub fn new(channels: usize) -> Self {
        Self { abs_max: vec![0.0; channels], abs_sum: vec![0.0; channels], tokens: 0, hessian: None }
    }

    /// Statistics that also accumulate `XᵀX` (`channels²` values).
    pub fn with_hessian(channels: usize) -> Self {
        Self { hessian: Some(vec![0.0; channels * channels]), ..Self::new(channels) }
    }

    /// `XᵀX` over the tokens seen, if this gathers it.
    pub fn hessian(&self) -> Option<&[f64]> {
        self.hessian.as_deref()
    }

    pub fn channels(&self) -> usize {
        self.abs_max.len()
    }

    /// Adds the rows of `x` (`[tokens, channels]`).
    pub fn update(&mut self, x: &[f32]) {
        let channels = self.channels();
        assert_eq!(x.len() % channels, 0, "ChannelStats::update: rows are not {channels} long");
        for row in x.chunks_exact(channels) {
            for ((m, s), v) in self.abs_max.iter_mut().zip(&mut self.abs_sum).zip(row) {
                *m = m.max(v.abs());
                *s += v.abs() as f64;
            }
        }
        let tokens = x.len() / channels;
        self.tokens += tokens as u64;
        if let Some(h) = &mut self.hessian {
            // XᵀX = (Xᵀ)·(Xᵀ)ᵀ on the f32 GEMM, summed in f64 across updates.
            let xt = transpose(x, tokens, channels);
            let mut xtx = vec![0.0f32; channels * channels];
            matmul_xwt(&xt, &xt, &mut xtx, channels, channels, tokens);
            h.iter_mut().zip(&xtx).for_each(|(h, &v)| *h += v as f64);
        }
    }

    /// `max |x_j|` over all tokens, per channel j.
    pub fn abs_max(&self) -> &[f32] {
        &self.abs_max
    }

    /// `mean |x_j|` over all tokens, per channel j (AWQ's activation salience).
    pub fn abs_mean(&self) -> Vec<f32> {
        let n = self.tokens.max(1) as f64;
        self.abs_sum.iter().map(|s| (s / n) as f32).collect()
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hessian_is_the_sum_of_outer_products() {
        let mut stats = ChannelStats::with_hessian(2);
        stats.update(&[1.0, 2.0, -1.0, 0.5]);
        stats.update(&[3.0, 0.0]);
        assert_eq!(stats.hessian().unwrap(), &[11.0, 1.5, 1.5, 4.25]);
        assert_eq!(ChannelStats::new(2).hessian(), None);
    }

    #[test]
    fn statistics_are_per_channel() {
        let mut stats = ChannelStats::new(3);
        stats.update(&[1.0, -4.0, 0.0, -2.0, 1.0, 0.5]);
        stats.update(&[0.5, 0.0, -3.0]);
        assert_eq!(stats.abs_max(), &[2.0, 4.0, 3.0]);
        assert_eq!(stats.abs_mean(), vec![3.5 / 3.0, 5.0 / 3.0, 3.5 / 3.0]);
        assert_eq!(stats.tokens(), 3);
    }
}
