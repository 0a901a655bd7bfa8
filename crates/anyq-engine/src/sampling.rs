//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling, with an
//! optional repetition penalty (the CTRL paper's rule, as Hugging Face and llama.cpp apply it).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1 = all.
    pub top_p: f32,
    /// > 1 discourages tokens already in the context; 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The next token, given the logits of the last position and the ids seen so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &id in history {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            candidates.truncate(p.top_k);
        }
        let max = candidates[0].1;
        let mut total = 0.0f64;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&(_, l)| {
                let e = ((l - max) as f64).exp();
                total += e;
                e
            })
            .collect();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&e| {
                    cumulative += e / total;
                    cumulative >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            total = probs.iter().sum();
        }
        let mut r = self.rng.random::<f64>() * total;
        for (i, e) in probs.iter().enumerate() {
            r -= e;
            if r <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
}

/// Index of the largest logit (the first, on ties, as `torch.argmax` picks).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let params = SamplingParams { temperature: 0.8, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&mut [0.0, 1.0, 5.0, 2.0], &[]), 2);
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed, ..Default::default() });
            (0..20).map(|_| s.sample(&mut [1.0; 8], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~88% of the mass: with top_p 0.5 nothing else can be drawn.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, seed: 3, ..Default::default() });
        for _ in 0..200 {
            assert_eq!(s.sample(&mut [4.0, 2.0, 1.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities e/(1+e) ≈ 0.731 and 0.269.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: 11, ..Default::default() });
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&mut [0.0, 1.0], &[]) == 1).count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.7311).abs() < 0.015, "frequency {freq}");
    }

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() });
        // Token 0 wins unpenalized (3.0 > 2.0), loses once seen (1.5 < 2.0).
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]), 1);
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
    }
}
