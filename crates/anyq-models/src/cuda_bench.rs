//! Decode throughput of a LLaMA-3-8B-shaped model (`anyq bench e2e`): random weights made on the GPU
//! itself, so no 16 GB checkpoint has to exist or travel, with the four linear layers of every
//! block in FP16 (cuBLAS) or MixQ W8A8 / W4A8, each variant running the same blocks
//! ([`CudaLlama::decode_step`]) over the same KV cache on the same GPU. The embedding and lm_head
//! are FP16 in every variant.
//!
//! Each step decodes one token for each of `batch` sequences, all at position `ctx` over a cache
//! filled with random keys and values: the step rewrites position `ctx` each time rather than
//! growing, so every timed step does the same work.

use std::sync::Arc;
use std::time::Instant;

use anyq_core::cpu::RopeStyle;
use anyq_cuda::mixq::{self, MixqWeight, OutlierSet};
use anyq_cuda::{CudaDevice, CudaError, CudaSlice, Timer};
use half::f16;

use crate::config::{Architecture, ModelConfig};
use crate::cuda::{CudaBatchCache, CudaDecodeBatch, CudaLayer, CudaLinear, CudaLlama, CudaModelError, CudaWeights};

/// LLaMA-3-8B's shapes (Meta-Llama-3-8B's `config.json`).
pub fn llama3_8b() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 128256,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        rope_style: RopeStyle::Neox,
        rope_freq_factors: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        qkv_bias: false,
    }
}

/// How the four linear layers of every block compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKind {
    /// f16 weights, cuBLAS GEMMs: the model's FP16/BF16 path.
    Fp16,
    /// MixQ: INT8 weights per row, INT8 activations per token, f16 outlier channels.
    W8A8,
    /// MixQ: 4-bit weights in groups of 128 with zero points, INT8 activations, f16 outliers.
    W4A8,
}

impl LinearKind {
    pub const ALL: [LinearKind; 3] = [LinearKind::Fp16, LinearKind::W8A8, LinearKind::W4A8];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp16 => "fp16",
            Self::W8A8 => "w8a8",
            Self::W4A8 => "w4a8",
        }
    }

    /// The name in tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Fp16 => "FP16",
            Self::W8A8 => "W8A8",
            Self::W4A8 => "W4A8",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name().eq_ignore_ascii_case(name))
    }

    fn mixq_bits(self) -> Option<u32> {
        match self {
            Self::Fp16 => None,
            Self::W8A8 => Some(8),
            Self::W4A8 => Some(4),
        }
    }
}

/// `percent`% of `k` channels (rounded), spread evenly over them in increasing order.
pub fn spread_outliers(k: usize, percent: f64) -> Vec<u32> {
    let count = ((percent / 100.0 * k as f64).round() as usize).min(k);
    (0..count).map(|i| (i * k / count) as u32).collect()
}

/// Distinct seeds for the random tensors (a MixQ weight uses three from its own).
struct Seeds(u64);

impl Seeds {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(4);
        self.0
    }
}

/// `len` uniform f16 values in `[-scale, scale)`.
fn random_f16(device: &CudaDevice, len: usize, seed: u64, scale: f32) -> Result<CudaSlice<f16>, CudaError> {
    let mut out = device.zeros::<f16>(len)?;
    mixq::fill_f16(device, &mut out, seed, scale)?;
    Ok(out)
}

/// RMSNorm weights near 1.
fn random_norm(device: &CudaDevice, len: usize, seed: u64) -> Result<CudaSlice<f32>, CudaError> {
    let mut out = device.zeros::<f32>(len)?;
    mixq::fill_f32_range(device, &mut out, seed, 0.8, 1.2)?;
    Ok(out)
}

/// A model of `config`'s shapes with random weights made on `device`, its block linears of
/// `kind`: FP16 weights uniform with variance 1/k (each layer keeps its input's scale), MixQ ones
/// as [`MixqWeight::random`] makes them, with `outlier_percent`% of each input's channels as
/// outliers (one set per input width, shared by every layer).
pub fn random_model(
    device: &Arc<CudaDevice>,
    config: &ModelConfig,
    kind: LinearKind,
    outlier_percent: f64,
    seed: u64,
) -> Result<CudaLlama, CudaModelError> {
    let c = config;
    let (h, ffn, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut seeds = Seeds(seed);
    let outliers = |k: usize| OutlierSet::new(device, k, &spread_outliers(k, outlier_percent));
    // o_proj reads the attention output, q_width channels wide.
    let (hidden_set, q_set, ffn_set) = (outliers(h)?, outliers(q_width)?, outliers(ffn)?);
    let linear = |(n, k): (usize, usize), set: &Arc<OutlierSet>, seed: u64| -> Result<CudaLinear, CudaModelError> {
        Ok(match kind.mixq_bits() {
            None => CudaLinear::Fp16 { weight: random_f16(device, n * k, seed, (3.0 / k as f32).sqrt())?, n, k },
            // Random weights have no calibration threshold: nothing is counted.
            Some(bits) => CudaLinear::Mixq {
                weight: MixqWeight::random(device, bits, (n, k), set, seed)?,
                threshold: f32::INFINITY,
            },
        })
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for _ in 0..c.num_layers {
        let qkv = linear((q_width + 2 * kv_width, h), &hidden_set, seeds.next())?;
        let o_proj = linear((h, q_width), &q_set, seeds.next())?;
        let gate_up = linear((2 * ffn, h), &hidden_set, seeds.next())?;
        let down = linear((h, ffn), &ffn_set, seeds.next())?;
        layers.push(CudaLayer {
            attn_norm: random_norm(device, h, seeds.next())?,
            mlp_norm: random_norm(device, h, seeds.next())?,
            qkv,
            qkv_bias: None,
            o_proj,
            gate_up,
            down,
        });
    }
    let embed = random_f16(device, vocab * h, seeds.next(), 1.0)?;
    let lm_head = match c.tie_word_embeddings {
        true => None,
        false => Some(random_f16(device, vocab * h, seeds.next(), (3.0 / h as f32).sqrt())?),
    };
    let final_norm = random_norm(device, h, seeds.next())?;
    CudaLlama::from_weights(device, c.clone(), CudaWeights { embed, lm_head, layers, final_norm })
}

/// What `anyq bench e2e` measures.
#[derive(Clone, Debug)]
pub struct DecodeBenchSettings {
    pub config: ModelConfig,
    /// Sequences per step, one measurement each.
    pub batches: Vec<usize>,
    /// Cached positions each sequence attends to besides its new token.
    pub ctx: usize,
    pub kinds: Vec<LinearKind>,
    /// MixQ outlier channels per linear input, in percent of its width.
    pub outlier_percent: f64,
    /// Untimed steps before each measurement (at least one: the first compiles the kernels).
    pub warmup: usize,
    /// Timed steps per measurement; the median is reported.
    pub steps: usize,
    pub seed: u64,
}

impl DecodeBenchSettings {
    /// Refuses settings that cannot run, before anything touches the GPU.
    pub fn check(&self) -> Result<(), CudaModelError> {
        let bad = |what: String| Err(CudaModelError::Unsupported(what));
        if self.batches.is_empty() || self.batches.contains(&0) {
            return bad(format!("batch sizes must be at least 1, got {:?}", self.batches));
        }
        let max_positions = self.config.max_position_embeddings;
        if self.ctx == 0 || self.ctx >= max_positions {
            return bad(format!(
                "the context must be 1 to {} positions (the model's {max_positions} less the new token), got {}",
                max_positions - 1,
                self.ctx
            ));
        }
        if self.kinds.is_empty() {
            return bad("no variant to measure".into());
        }
        if !(0.0..=50.0).contains(&self.outlier_percent) {
            return bad(format!("outliers are a percentage in 0..=50, got {}", self.outlier_percent));
        }
        if self.warmup == 0 || self.steps == 0 {
            return bad(format!(
                "at least one warm-up step (the first compiles the kernels) and one timed step, got {} and {}",
                self.warmup, self.steps
            ));
        }
        if self.config.num_layers == 0 {
            return bad("the model needs at least one layer".into());
        }
        Ok(())
    }

    pub fn max_batch(&self) -> usize {
        self.batches.iter().copied().max().unwrap_or(0)
    }

    /// Device bytes of the KV cache, shared by every variant.
    pub fn cache_bytes(&self) -> usize {
        CudaBatchCache::bytes_for(&self.config, self.max_batch(), self.ctx + 1)
    }
}

/// One variant at one batch size.
#[derive(Clone, Debug)]
pub struct DecodeTiming {
    pub kind: LinearKind,
    pub batch: usize,
    /// Median device time of a step (CUDA events), ms.
    pub step_ms: f64,
    /// Median host time to launch a step's kernels, ms: where it nears `step_ms`, the GPU waited
    /// for the launches and the step time measures the host.
    pub launch_ms: f64,
    /// Whether the first and last sequences' logits were all finite after the timed steps.
    pub finite: bool,
}

impl DecodeTiming {
    pub fn tokens_per_second(&self) -> f64 {
        self.batch as f64 / (self.step_ms * 1e-3)
    }
}

/// Measures every variant of `settings` at every batch size on `device`, one model at a time (each
/// dropped before the next is made) over one KV cache for the largest batch; `report` sees each
/// timing as it comes.
pub fn bench_decode(
    device: &Arc<CudaDevice>,
    settings: &DecodeBenchSettings,
    mut report: impl FnMut(&DecodeTiming),
) -> Result<Vec<DecodeTiming>, CudaModelError> {
    settings.check()?;
    let c = &settings.config;
    let max_batch = settings.max_batch();
    let mut cache = CudaBatchCache::new(device, c, max_batch, settings.ctx + 1)?;
    cache.fill_random(device, settings.seed ^ 0x5eed, 1.0)?;
    let mut timings = Vec::new();
    for &kind in &settings.kinds {
        let model = random_model(device, c, kind, settings.outlier_percent, settings.seed)?;
        let mut batch = model.new_decode_batch(max_batch)?;
        for &sequences in &settings.batches {
            let tokens: Vec<u32> =
                (0..sequences as u64).map(|i| ((i * 7919 + 13) % c.vocab_size as u64) as u32).collect();
            model.set_decode_inputs(&mut batch, &tokens, &vec![settings.ctx; sequences])?;
            let timing = time_steps(&model, &mut cache, &mut batch, kind, settings)?;
            report(&timing);
            timings.push(timing);
        }
        // Both freed before the next variant's weights are made.
        drop(batch);
        drop(model);
        device.synchronize()?;
    }
    Ok(timings)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn time_steps(
    model: &CudaLlama,
    cache: &mut CudaBatchCache,
    batch: &mut CudaDecodeBatch,
    kind: LinearKind,
    settings: &DecodeBenchSettings,
) -> Result<DecodeTiming, CudaModelError> {
    let device = model.device().as_ref();
    for _ in 0..settings.warmup {
        model.decode_step(cache, batch)?;
    }
    device.synchronize()?;
    let (mut step_ms, mut launch_ms) = (Vec::new(), Vec::new());
    for _ in 0..settings.steps {
        let timer = Timer::start(device)?;
        let start = Instant::now();
        model.decode_step(cache, batch)?;
        launch_ms.push(start.elapsed().as_secs_f64() * 1e3);
        step_ms.push(timer.elapsed_ms()? as f64);
    }
    let sequences = batch.sequences();
    let mut finite = true;
    for b in [0, sequences - 1] {
        finite &= batch.logits(device, b)?.iter().all(|v| v.is_finite());
    }
    Ok(DecodeTiming { kind, batch: sequences, step_ms: median(step_ms), launch_ms: median(launch_ms), finite })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outliers_are_spread_evenly_and_rounded() {
        assert_eq!(spread_outliers(4096, 1.0).len(), 41);
        assert_eq!(spread_outliers(14336, 1.0).len(), 143);
        let channels = spread_outliers(1000, 5.0);
        assert_eq!(channels, (0..50).map(|i| i * 20).collect::<Vec<u32>>());
        assert!(spread_outliers(4096, 0.0).is_empty());
        assert_eq!(spread_outliers(7, 50.0), vec![0, 1, 3, 5]);
        assert!(spread_outliers(3, 100.0).windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn variants_parse_by_name() {
        for kind in LinearKind::ALL {
            assert_eq!(LinearKind::parse(kind.name()), Some(kind));
        }
        assert_eq!(LinearKind::parse("W8A8"), Some(LinearKind::W8A8));
        assert_eq!(LinearKind::parse("int8"), None);
    }

    fn settings() -> DecodeBenchSettings {
        DecodeBenchSettings {
            config: llama3_8b(),
            batches: vec![1, 16, 64, 256, 512],
            ctx: 128,
            kinds: LinearKind::ALL.to_vec(),
            outlier_percent: 1.0,
            warmup: 2,
            steps: 5,
            seed: 1,
        }
    }

    #[test]
    fn settings_that_cannot_run_are_refused() {
        assert!(settings().check().is_ok());
        let refused = |change: &dyn Fn(&mut DecodeBenchSettings)| {
            let mut s = settings();
            change(&mut s);
            matches!(s.check(), Err(CudaModelError::Unsupported(_)))
        };
        assert!(refused(&|s| s.batches = vec![]));
        assert!(refused(&|s| s.batches = vec![1, 0]));
        assert!(refused(&|s| s.ctx = 0));
        assert!(refused(&|s| s.ctx = 8192));
        assert!(refused(&|s| s.kinds.clear()));
        assert!(refused(&|s| s.outlier_percent = -1.0));
        assert!(refused(&|s| s.outlier_percent = f64::NAN));
        assert!(refused(&|s| s.warmup = 0));
        assert!(refused(&|s| s.steps = 0));
        assert!(refused(&|s| s.config.num_layers = 0));
    }

    /// 512 sequences of 129 positions: 512 · 129 · 32 layers · (k, v) · 1024 · 2 bytes.
    #[test]
    fn the_cache_for_the_largest_batch_is_about_8_7_gb() {
        assert_eq!(settings().cache_bytes(), 512 * 129 * 32 * 2 * 1024 * 2);
    }
}
