//! Activation statistics gathered on calibration text: what SmoothQuant's smoothing factors,
//! MixQ's outlier channels and AWQ's scales are computed from.

/// Per-input-channel statistics of the activations `[tokens, channels]` that one linear layer reads.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    abs_max: Vec<f32>,
    abs_sum: Vec<f64>,
    tokens: u64,
}

impl ChannelStats {
    pub fn new(channels: usize) -> Self {
        Self { abs_max: vec![0.0; channels], abs_sum: vec![0.0; channels], tokens: 0 }
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
        self.tokens += (x.len() / channels) as u64;
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
    fn statistics_are_per_channel() {
        let mut stats = ChannelStats::new(3);
        stats.update(&[1.0, -4.0, 0.0, -2.0, 1.0, 0.5]);
        stats.update(&[0.5, 0.0, -3.0]);
        assert_eq!(stats.abs_max(), &[2.0, 4.0, 3.0]);
        assert_eq!(stats.abs_mean(), vec![3.5 / 3.0, 5.0 / 3.0, 3.5 / 3.0]);
        assert_eq!(stats.tokens(), 3);
    }
}
