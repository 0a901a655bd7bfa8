//! The FP16 model on the GPU against the CPU model: small random models that take every branch
//! of the config (both RoPE layouts, frequency factors, QKV biases, tied and untied outputs,
//! prompts longer than a prefill chunk), and the real SmolLM2-135M-Instruct: the last position's
//! logits agree to f16 accuracy and greedy decoding picks the same tokens. Then MixQ on the GPU:
//! hand-made MixQ weights, and models quantized by anyq's MixQ (random ones through a checkpoint,
//! and SmolLM2) against the CPU model holding the same MixQ layers.
//!
//! On a machine without a GPU each test says so and returns, unless ANYQ_REQUIRE_GPU is set,
//! which turns a missing GPU (or a missing model file) into a failure. The model is read from
//! ANYQ_MODEL, else from `assets/` (ANYQ_ASSETS).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyq_core::cpu::RopeStyle;
use anyq_core::testing::XorShift;
use anyq_core::{DenseLinear, Linear, Tensor};
use anyq_cuda::mixq::{MixqWeight, OutlierSet};
use anyq_cuda::testing::{gpu_or_skip as device, gpu_required as require_gpu};
use anyq_cuda::CudaDevice;
use anyq_models::cuda::{
    CudaBatchCache, CudaKvCache, CudaLayer, CudaLinear, CudaLlama, CudaModelError, CudaWeights, MixqCounts,
    PREFILL_CHUNK,
};
use anyq_models::cuda_bench::{self, DecodeBenchSettings, LinearKind};
use anyq_models::loader::WeightSource;
use anyq_models::{
    load_model, save_quantized, ActivationObserver, Architecture, CpuDecoder, Decoder, ForwardError, LinearInput,
    LlamaModel, LoadError, LoadedModel, ModelConfig, LINEAR_MODULES,
};
use anyq_quant::calibration::ChannelStats;
use anyq_quant::methods::method_by_name;
use anyq_quant::methods::mixq::{MixQ, MixQLinear};
use anyq_quant::methods::LayerToQuantize;
use half::f16;

/// ‖got − want‖ / ‖want‖.
fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The first largest logit, as greedy sampling picks it.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// f16 rounds each activation at 2⁻¹¹; through 30 layers the logits move by well under 1%.
const LOGIT_TOLERANCE: f64 = 2e-2;

// ---- small random models ----

struct RandomWeights(HashMap<String, Tensor>);

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>, LoadError> {
        Ok(self.0.get(name).cloned())
    }

    fn source_path(&self) -> PathBuf {
        PathBuf::from("random weights")
    }
}

/// A LLaMA with random weights of `config`'s shapes, scaled so that activations stay O(1).
fn random_model(config: &ModelConfig, seed: u64) -> LlamaModel {
    // q and k twice as large: attention that is peaked, not flat.
    random_model_with_qk_gain(config, seed, 2.0)
}

fn random_model_with_qk_gain(config: &ModelConfig, seed: u64, qk_gain: f32) -> LlamaModel {
    load_random(config, random_tensors(config, seed, qk_gain))
}

fn load_random(config: &ModelConfig, tensors: HashMap<String, Tensor>) -> LlamaModel {
    LlamaModel::load(config.clone(), &RandomWeights(tensors), None, &|_, _| {}).unwrap()
}

/// [`random_model_with_qk_gain`]'s tensors, by Hugging Face name.
fn random_tensors(config: &ModelConfig, seed: u64, qk_gain: f32) -> HashMap<String, Tensor> {
    let c = config;
    let mut rng = XorShift::new(seed);
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data = rng.floats(n).into_iter().map(|v| offset + scale * v).collect();
        tensors.insert(name, Tensor::new(shape, data).unwrap());
    };
    let (h, q_width, kv_width, ffn) =
        (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let inv_sqrt = |k: usize| 1.0 / (k as f32).sqrt();
    add("model.embed_tokens.weight".into(), vec![c.vocab_size, h], 1.0, 0.0);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h], 0.2, 1.0);
        for (module, out, inp) in [
            ("self_attn.q_proj", q_width, h),
            ("self_attn.k_proj", kv_width, h),
            ("self_attn.v_proj", kv_width, h),
            ("self_attn.o_proj", h, q_width),
            ("mlp.gate_proj", ffn, h),
            ("mlp.up_proj", ffn, h),
            ("mlp.down_proj", h, ffn),
        ] {
            let gain = if module == "self_attn.q_proj" || module == "self_attn.k_proj" { qk_gain } else { 1.0 };
            add(format!("{p}.{module}.weight"), vec![out, inp], gain * 1.7 * inv_sqrt(inp), 0.0);
            if c.qkv_bias && ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].contains(&module) {
                add(format!("{p}.{module}.bias"), vec![out], 0.5, 0.0);
            }
        }
    }
    add("model.norm.weight".into(), vec![h], 0.2, 1.0);
    if !c.tie_word_embeddings {
        add("lm_head.weight".into(), vec![c.vocab_size, h], 1.7 * inv_sqrt(h), 0.0);
    }
    tensors
}

fn llama_config() -> ModelConfig {
    // SmolLM2's heads (GQA 9/3, d 64) on narrow layers, and a context past one prefill chunk.
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 301,
        hidden_size: 200,
        intermediate_size: 328,
        num_layers: 3,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        rope_style: RopeStyle::Interleaved,
        rope_freq_factors: None,
        max_position_embeddings: 1024,
        tie_word_embeddings: true,
        qkv_bias: false,
    }
}

fn qwen_like_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: 77,
        hidden_size: 96,
        intermediate_size: 100,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 4,
        head_dim: 24,
        rms_norm_eps: 1e-6,
        rope_theta: 500000.0,
        rope_style: RopeStyle::Neox,
        rope_freq_factors: Some((0..12).map(|i| 1.0 + 0.5 * i as f32).collect()),
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        qkv_bias: true,
    }
}

/// Prefill `prompt`, then decode `steps` tokens fed one at a time, on both devices: every step's
/// logits agree.
fn check_against_cpu(device: &Arc<CudaDevice>, model: &LlamaModel, prompt: &[u32], steps: usize, what: &str) {
    let gpu = CudaLlama::new(device, model).unwrap();
    let capacity = prompt.len() + steps;
    let mut gpu_cache = gpu.new_cache(capacity).unwrap();
    let mut cpu_cache = model.new_cache();
    let mut next = prompt.to_vec();
    for step in 0..=steps {
        let want = model.forward_last(&next, &mut cpu_cache).unwrap();
        let got = gpu.forward_last(&next, &mut gpu_cache).unwrap();
        let error = relative_l2(&got, &want);
        eprintln!("{what}, step {step}: relative L2 error {error:.2e}");
        assert!(error < LOGIT_TOLERANCE, "{what}, step {step}: relative L2 error {error:.2e}");
        assert_eq!(gpu_cache.len(), cpu_cache.len());
        // Feed the CPU's choice to both, so the sequences stay the same.
        next = vec![argmax(&want)];
    }
}

/// The logits of every position of `tokens` through `forward_all`, checking that they come in order.
fn all_logits(decoder: &mut impl Decoder, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    decoder
        .forward_all(tokens, &mut |i, logits| {
            assert_eq!(i, rows.len(), "positions out of order");
            rows.push(logits.to_vec());
        })
        .unwrap();
    assert_eq!(rows.len(), tokens.len(), "one row of logits per token");
    rows
}

/// Every position's logits (what perplexity reads) agree.
fn check_all_positions_against_cpu(device: &Arc<CudaDevice>, model: &LlamaModel, tokens: &[u32], what: &str) {
    let gpu = CudaLlama::new(device, model).unwrap();
    let want = all_logits(&mut CpuDecoder::new(model), tokens);
    let mut decoder = gpu.decoder(tokens.len()).unwrap();
    let got = all_logits(&mut decoder, tokens);
    let worst = got.iter().zip(&want).map(|(g, w)| relative_l2(g, w)).fold(0.0, f64::max);
    eprintln!("{what}, all {} positions: worst relative L2 error {worst:.2e}", tokens.len());
    assert!(worst < LOGIT_TOLERANCE, "{what}: worst relative L2 error {worst:.2e}");
    // A cleared decoder starts a new sequence: it gives what a new one gives, bit for bit.
    let fresh = all_logits(&mut gpu.decoder(3).unwrap(), &tokens[..3]);
    decoder.clear();
    assert_eq!(decoder.positions(), 0);
    assert_eq!(all_logits(&mut decoder, &tokens[..3]), fresh, "{what}: a cleared cache must start a new sequence");
}

#[test]
fn random_llama_with_interleaved_rope_and_gqa_matches_the_cpu() {
    let Some(device) = device() else { return };
    let config = llama_config();
    let model = random_model(&config, 1);
    let mut rng = XorShift::new(11);
    let vocab = config.vocab_size as u64;
    // Two prefill chunks, the second partial.
    let long: Vec<u32> = (0..PREFILL_CHUNK + 77).map(|_| (rng.next_u64() % vocab) as u32).collect();
    check_against_cpu(&device, &model, &long, 4, "llama, long prompt");
    check_against_cpu(&device, &model, &long[..7], 40, "llama, short prompt");
    check_against_cpu(&device, &model, &long[..1], 3, "llama, one-token prompt");
    check_all_positions_against_cpu(&device, &model, &long, "llama");
}

#[test]
fn random_model_with_neox_rope_factors_biases_and_an_untied_head_matches_the_cpu() {
    let Some(device) = device() else { return };
    let config = qwen_like_config();
    let model = random_model(&config, 2);
    let prompt: Vec<u32> = (0..20).map(|i| (i * 7 % 77) as u32).collect();
    check_against_cpu(&device, &model, &prompt, 40, "qwen-like");
    check_all_positions_against_cpu(&device, &model, &prompt, "qwen-like");
}

#[test]
fn the_cache_refuses_what_does_not_fit() {
    let Some(device) = device() else { return };
    let config = qwen_like_config();
    let model = random_model(&config, 3);
    let gpu = CudaLlama::new(&device, &model).unwrap();
    assert!(matches!(gpu.new_cache(0), Err(CudaModelError::Unsupported(_))));
    assert!(matches!(gpu.new_cache(65), Err(CudaModelError::Unsupported(_))));
    let mut cache = gpu.new_cache(8).unwrap();
    let full = gpu.forward_last(&[1; 9], &mut cache).unwrap_err();
    assert!(matches!(full, CudaModelError::Forward(ForwardError::ContextExceeded { needed: 9, max: 8 })), "{full}");
    let bad = gpu.forward_last(&[1, 77], &mut cache).unwrap_err();
    assert!(matches!(bad, CudaModelError::Forward(ForwardError::TokenOutOfRange { id: 77, .. })), "{bad}");
    assert!(matches!(gpu.forward_last(&[], &mut cache), Err(CudaModelError::Forward(ForwardError::Empty))));
    assert!(cache.is_empty(), "refused calls leave the cache as it was");
    gpu.forward_last(&[1; 8], &mut cache).unwrap();
    assert_eq!(cache.len(), 8);
    let full = gpu.forward_last(&[1], &mut cache).unwrap_err();
    assert!(matches!(full, CudaModelError::Forward(ForwardError::ContextExceeded { .. })), "{full}");
}

/// A layer that is neither f32 nor GGML: what a quantization method's layer looks like here.
struct OpaqueLinear(usize, usize);

impl Linear for OpaqueLinear {
    fn in_features(&self) -> usize {
        self.1
    }
    fn out_features(&self) -> usize {
        self.0
    }
    fn forward(&self, _x: &[f32], _m: usize, out: &mut [f32]) {
        out.fill(0.0);
    }
    fn weight_bytes(&self) -> usize {
        0
    }
    fn weight_row(&self, _row: usize, out: &mut [f32]) {
        out.fill(0.0);
    }
    fn bias(&self) -> Option<&[f32]> {
        None
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn quantized_layers_are_refused_with_a_clear_message() {
    let Some(device) = device() else { return };
    let config = qwen_like_config();
    let mut model = random_model(&config, 4);
    let (n, k) = (config.hidden_size, config.intermediate_size);
    model.replace_linear(1, "mlp.down_proj", Box::new(OpaqueLinear(n, k))).unwrap();
    let err = CudaLlama::new(&device, &model).err().expect("a quantized layer cannot run in FP16");
    assert!(err.to_string().contains("only FP16 and MixQ models run on the GPU"), "{err}");
    assert!(err.to_string().contains("layer 1 mlp.down_proj"), "{err}");

    // MixQ layers the GPU kernels cannot take: 4-bit groups of 64, and a q/k/v of which only q is
    // MixQ (the GPU runs the three as one layer).
    let config = llama_config();
    let refusal = |layer: usize, module: &str, group: Option<usize>| {
        let mut model = random_model(&config, 4);
        let old = model.linear(layer, module).unwrap();
        let (weight, n, k) = (old.dense_weight(), old.out_features(), old.in_features());
        let to_quantize =
            LayerToQuantize { weight: &weight, bias: None, out_features: n, in_features: k, input_stats: None };
        let mixq = MixQLinear::new(&to_quantize, group, &[1, 2], 1.0, None).unwrap();
        model.replace_linear(layer, module, Box::new(mixq)).unwrap();
        CudaLlama::new(&device, &model).err().expect("refused").to_string()
    };
    let err = refusal(1, "mlp.down_proj", Some(64));
    assert!(err.contains("layer 1 mlp.down_proj") && err.contains("groups of a multiple of 128"), "{err}");
    let err = refusal(0, "self_attn.q_proj", None);
    assert!(
        err.contains("layer 0 q/k/v_proj: layer 0 self_attn.q_proj is MixQ but layer 0 self_attn.k_proj is not"),
        "{err}"
    );
}

// ---- batched decode ----

/// `sequences` sequences decoded together for `steps` steps, sequence b starting at step b (until
/// then it decodes its first token at position 0 again and again, which its real first step
/// repeats), so that every step holds sequences at different positions: each sequence's logits
/// agree with the CPU model decoding it alone.
fn check_batched_decode_against_cpu(
    device: &Arc<CudaDevice>,
    gpu: &CudaLlama,
    cpu: &LlamaModel,
    (sequences, steps): (usize, usize),
    tolerance: f64,
    what: &str,
) {
    let vocab = cpu.config.vocab_size as u64;
    let mut rng = XorShift::new(sequences as u64);
    let tokens: Vec<Vec<u32>> =
        (0..sequences).map(|_| (0..steps).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect();
    let mut cache = CudaBatchCache::new(device, gpu.config(), sequences, steps).unwrap();
    let mut batch = gpu.new_decode_batch(sequences).unwrap();
    let mut cpu_caches: Vec<_> = (0..sequences).map(|_| cpu.new_cache()).collect();
    let mut worst = 0.0f64;
    for t in 0..steps {
        let positions: Vec<usize> = (0..sequences).map(|b| t.saturating_sub(b)).collect();
        let step_tokens: Vec<u32> = (0..sequences).map(|b| tokens[b][positions[b]]).collect();
        gpu.set_decode_inputs(&mut batch, &step_tokens, &positions).unwrap();
        gpu.decode_step(&mut cache, &mut batch).unwrap();
        for b in (0..sequences).filter(|&b| t >= b) {
            let want = cpu.forward_last(&[step_tokens[b]], &mut cpu_caches[b]).unwrap();
            let error = relative_l2(&batch.logits(device, b).unwrap(), &want);
            assert!(
                error < tolerance,
                "{what}: step {t}, sequence {b} at {}: relative L2 error {error:.2e}",
                positions[b]
            );
            worst = worst.max(error);
        }
    }
    eprintln!("{what}: {sequences} sequences, {steps} steps: worst relative L2 error {worst:.2e}");
}

#[test]
fn batched_decode_matches_the_cpu_sequence_by_sequence() {
    let Some(device) = device() else { return };
    for (config, seed) in [(llama_config(), 5), (qwen_like_config(), 6)] {
        let model = random_model(&config, seed);
        let gpu = CudaLlama::new(&device, &model).unwrap();
        let what = format!("{:?} FP16", config.architecture);
        check_batched_decode_against_cpu(&device, &gpu, &model, (1, 5), LOGIT_TOLERANCE, &what);
        check_batched_decode_against_cpu(&device, &gpu, &model, (6, 40), LOGIT_TOLERANCE, &what);
    }
}

#[test]
fn batched_decode_refuses_what_does_not_fit() {
    let Some(device) = device() else { return };
    let config = qwen_like_config();
    let gpu = CudaLlama::new(&device, &random_model(&config, 7)).unwrap();
    assert!(matches!(CudaBatchCache::new(&device, &config, 0, 8), Err(CudaModelError::Unsupported(_))));
    assert!(matches!(CudaBatchCache::new(&device, &config, 2, 65), Err(CudaModelError::Unsupported(_))));
    assert!(matches!(gpu.new_decode_batch(0), Err(CudaModelError::Unsupported(_))));
    let mut cache = CudaBatchCache::new(&device, &config, 2, 8).unwrap();
    let mut batch = gpu.new_decode_batch(3).unwrap();
    let empty = gpu.decode_step(&mut cache, &mut batch).unwrap_err();
    assert!(matches!(empty, CudaModelError::Forward(ForwardError::Empty)), "{empty}");
    let bad = gpu.set_decode_inputs(&mut batch, &[1, 77], &[0, 0]).unwrap_err();
    assert!(matches!(bad, CudaModelError::Forward(ForwardError::TokenOutOfRange { id: 77, .. })), "{bad}");
    assert!(gpu.set_decode_inputs(&mut batch, &[1, 2], &[0]).is_err(), "a position per token");
    assert!(gpu.set_decode_inputs(&mut batch, &[1; 4], &[0; 4]).is_err(), "more sequences than the batch holds");
    let past = gpu.set_decode_inputs(&mut batch, &[1], &[64]).unwrap_err();
    assert!(matches!(past, CudaModelError::Forward(ForwardError::ContextExceeded { needed: 65, max: 64 })), "{past}");
    // Positions past the cache's 8, and more sequences than its 2, are refused at the step.
    gpu.set_decode_inputs(&mut batch, &[1, 2], &[3, 8]).unwrap();
    let full = gpu.decode_step(&mut cache, &mut batch).unwrap_err();
    assert!(matches!(full, CudaModelError::Forward(ForwardError::ContextExceeded { needed: 9, max: 8 })), "{full}");
    gpu.set_decode_inputs(&mut batch, &[1, 2, 3], &[0, 0, 0]).unwrap();
    assert!(matches!(gpu.decode_step(&mut cache, &mut batch), Err(CudaModelError::Unsupported(_))));
    gpu.set_decode_inputs(&mut batch, &[1, 2], &[0, 7]).unwrap();
    gpu.decode_step(&mut cache, &mut batch).unwrap();
    let mut other = CudaBatchCache::new(&device, &llama_config(), 2, 8).unwrap();
    assert!(gpu.decode_step(&mut other, &mut batch).is_err(), "a cache of another model's shape");
}

// ---- MixQ layers ----

/// MixQ's int8 activations alone move the logits of these random models (with flatter attention
/// than `random_model`'s, which amplifies them 2-3 times more) by up to 3% (measured with the CPU
/// MixQ layers over 20 steps); a wrong buffer, layout or norm weight moves them by 20% to all.
const MIXQ_TOLERANCE: f64 = 0.08;

/// 3% of `k` channels as outliers, as the benchmark spreads them, moved by `block`: each block
/// has sets of its own, as calibration chooses them.
fn outlier_set(device: &CudaDevice, k: usize, block: usize) -> Arc<OutlierSet> {
    let mut channels: Vec<u32> =
        cuda_bench::spread_outliers(k, 3.0).iter().map(|&c| (c + block as u32) % k as u32).collect();
    channels.sort_unstable();
    OutlierSet::new(device, k, &channels).unwrap()
}

/// `w` `[n][k]` quantized on the host as MixQ stores it (W8 per row; W4 per row and group of 128
/// with zero points), `outliers`' columns kept in f16: the GPU weight, and the weight it computes
/// with.
fn quantize_mixq(
    device: &CudaDevice,
    w: &[f32],
    (n, k): (usize, usize),
    bits: u32,
    outliers: &Arc<OutlierSet>,
) -> (MixqWeight, Vec<f32>) {
    let channels = outliers.channels();
    let mut is_outlier = vec![false; k];
    for &c in channels {
        is_outlier[c as usize] = true;
    }
    let mut dequantized = w.to_vec();
    let outlier_weight: Vec<f16> =
        (0..n).flat_map(|r| channels.iter().map(move |&c| f16::from_f32(w[r * k + c as usize]))).collect();
    for r in 0..n {
        for (i, &c) in channels.iter().enumerate() {
            dequantized[r * k + c as usize] = outlier_weight[r * channels.len() + i].to_f32();
        }
    }
    let is_outlier = &is_outlier;
    // The columns of row r in `cols` that are not outliers, with their values.
    let kept =
        |r: usize, cols: std::ops::Range<usize>| cols.filter(move |&c| !is_outlier[c]).map(move |c| (c, w[r * k + c]));
    if bits == 8 {
        let (mut q, mut scales) = (vec![0i8; n * k], vec![0.0f32; n]);
        for r in 0..n {
            let amax = kept(r, 0..k).fold(0.0f32, |m, (_, v)| m.max(v.abs()));
            scales[r] = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            for (c, v) in kept(r, 0..k) {
                q[r * k + c] = (v / scales[r]).round().clamp(-127.0, 127.0) as i8;
                dequantized[r * k + c] = q[r * k + c] as f32 * scales[r];
            }
        }
        (MixqWeight::w8(device, &q, &scales, (n, k), outliers, &outlier_weight).unwrap(), dequantized)
    } else {
        let (group, groups) = (128, k.div_ceil(128));
        let (mut q, mut scales, mut zeros) = (vec![0u8; n * k], vec![0.0f32; n * groups], vec![0u8; n * groups]);
        for r in 0..n {
            for g in 0..groups {
                let cols = g * group..k.min((g + 1) * group);
                // The range always holds 0, so that the zero point is a level.
                let values = || kept(r, cols.clone()).map(|(_, v)| v);
                let (lo, hi) = (values().fold(0.0f32, f32::min), values().fold(0.0f32, f32::max));
                let scale = if hi > lo { (hi - lo) / 15.0 } else { 1.0 };
                let zero = (-lo / scale).round().clamp(0.0, 15.0);
                (scales[r * groups + g], zeros[r * groups + g]) = (scale, zero as u8);
                for c in cols.clone() {
                    q[r * k + c] = zero as u8;
                }
                for (c, v) in kept(r, cols) {
                    let level = ((v / scale).round() + zero).clamp(0.0, 15.0);
                    q[r * k + c] = level as u8;
                    dequantized[r * k + c] = scale * (level - zero);
                }
            }
        }
        (MixqWeight::w4(device, &q, &scales, &zeros, (n, k), group, outliers, &outlier_weight).unwrap(), dequantized)
    }
}

/// `cpu`'s weights on the GPU with the linear layers that `mixq(layer, j)` picks (j: q/k/v,
/// o_proj, gate/up, down) in MixQ of `bits`, the others in FP16; those layers of `cpu` are
/// replaced by the weights MixQ computes with, so both models compute the same function but for
/// MixQ's int8 activations.
fn mixq_weights(
    device: &Arc<CudaDevice>,
    cpu: &mut LlamaModel,
    bits: u32,
    mixq: impl Fn(usize, usize) -> bool,
) -> CudaWeights {
    let c = cpu.config.clone();
    let (h, ffn) = (c.hidden_size, c.intermediate_size);
    let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let f16s = |v: &[f32]| device.upload(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).unwrap();
    let fused = [
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"][..],
        &["self_attn.o_proj"],
        &["mlp.gate_proj", "mlp.up_proj"],
        &["mlp.down_proj"],
    ];
    let mut layers = Vec::new();
    for i in 0..c.num_layers {
        let sets = [h, q_width, h, ffn].map(|k| outlier_set(device, k, i));
        let mut linears = Vec::new();
        for (j, modules) in fused.iter().enumerate() {
            let parts: Vec<(Vec<f32>, usize, Option<Vec<f32>>)> = modules
                .iter()
                .map(|m| {
                    let l = cpu.linear(i, m).unwrap();
                    (l.dense_weight(), l.out_features(), l.bias().map(<[f32]>::to_vec))
                })
                .collect();
            let k = cpu.linear(i, modules[0]).unwrap().in_features();
            let stacked: Vec<f32> = parts.iter().flat_map(|(w, _, _)| w.clone()).collect();
            let n = stacked.len() / k;
            if !mixq(i, j) {
                linears.push(CudaLinear::Fp16 { weight: f16s(&stacked), n, k });
                continue;
            }
            let (weight, dequantized) = quantize_mixq(device, &stacked, (n, k), bits, &sets[j]);
            let mut rows = dequantized.chunks_exact(k);
            for (m, (_, out, bias)) in modules.iter().zip(parts) {
                let w: Vec<f32> = rows.by_ref().take(out).flatten().copied().collect();
                cpu.replace_linear(i, m, Box::new(DenseLinear::new(w, bias, out, k))).unwrap();
            }
            linears.push(CudaLinear::Mixq { weight, threshold: f32::INFINITY });
        }
        let qkv_bias = c.qkv_bias.then(|| {
            let bias: Vec<f32> =
                fused[0].iter().flat_map(|m| cpu.linear(i, m).unwrap().bias().unwrap().to_vec()).collect();
            device.upload(&bias).unwrap()
        });
        let [qkv, o_proj, gate_up, down]: [CudaLinear; 4] = linears.try_into().ok().unwrap();
        let (attn_norm, mlp_norm) = cpu.block_norms(i).unwrap();
        layers.push(CudaLayer {
            attn_norm: device.upload(attn_norm).unwrap(),
            mlp_norm: device.upload(mlp_norm).unwrap(),
            qkv,
            qkv_bias,
            o_proj,
            gate_up,
            down,
        });
    }
    assert_eq!(q_width + 2 * kv_width, layers[0].qkv.shape().0);
    let embed = f16s(&cpu.embed_tokens().dense_weight());
    let lm_head = (!c.tie_word_embeddings).then(|| f16s(&cpu.lm_head().dense_weight()));
    let final_norm = device.upload(cpu.final_norm()).unwrap();
    CudaWeights { embed, lm_head, layers, final_norm }
}

fn mixq_model(
    device: &Arc<CudaDevice>,
    cpu: &mut LlamaModel,
    bits: u32,
    mixq: impl Fn(usize, usize) -> bool,
) -> CudaLlama {
    let weights = mixq_weights(device, cpu, bits, mixq);
    CudaLlama::from_weights(device, cpu.config.clone(), weights).unwrap()
}

/// The GPU model's logits against the CPU's, MixQ's tolerance: the whole prompt, then its first
/// token again as a decode step. Returns the GPU's cache.
fn prefill_and_step_against_cpu(gpu: &CudaLlama, cpu: &LlamaModel, prompt: &[u32], what: &str) -> CudaKvCache {
    let mut gpu_cache = gpu.new_cache(prompt.len() + 1).unwrap();
    let mut cpu_cache = cpu.new_cache();
    for (step, tokens) in [prompt, &prompt[..1]].into_iter().enumerate() {
        let want = cpu.forward_last(tokens, &mut cpu_cache).unwrap();
        let error = relative_l2(&gpu.forward_last(tokens, &mut gpu_cache).unwrap(), &want);
        eprintln!("{what}, {} tokens: relative L2 error {error:.2e}", tokens.len());
        assert!(error < MIXQ_TOLERANCE, "{what}, step {step}: relative L2 error {error:.2e}");
    }
    gpu_cache
}

/// Prefill (the tiled MixQ GEMMs), one-token decode (the GEMVs) and batched decode of few and
/// many sequences, against the CPU model with MixQ's weights.
fn check_mixq_against_cpu(device: &Arc<CudaDevice>, config: &ModelConfig, bits: u32, mixed: bool, what: &str) {
    let mut cpu = random_model_with_qk_gain(config, 8, 1.0);
    // Mixed: the layers alternate, so every hand-over between FP16 and MixQ sub-layers occurs.
    let gpu = mixq_model(device, &mut cpu, bits, |i, j| !mixed || (i + j) % 2 == 0);
    let vocab = config.vocab_size as u64;
    let mut rng = XorShift::new(9);
    let prompt: Vec<u32> = (0..40).map(|_| (rng.next_u64() % vocab) as u32).collect();
    prefill_and_step_against_cpu(&gpu, &cpu, &prompt, what);
    check_batched_decode_against_cpu(device, &gpu, &cpu, (3, 8), MIXQ_TOLERANCE, what);
    check_batched_decode_against_cpu(device, &gpu, &cpu, (20, 24), MIXQ_TOLERANCE, what);
}

#[test]
fn mixq_layers_compute_what_their_weights_say() {
    let Some(device) = device() else { return };
    for config in [llama_config(), qwen_like_config()] {
        for bits in [8, 4] {
            for mixed in [false, true] {
                let what =
                    format!("{:?} W{bits}A8{}", config.architecture, if mixed { " mixed with FP16" } else { "" });
                check_mixq_against_cpu(&device, &config, bits, mixed, &what);
            }
        }
    }
}

#[test]
fn weights_of_the_wrong_shape_are_refused() {
    let Some(device) = device() else { return };
    let config = llama_config();
    let (h, ffn) = (config.hidden_size, config.intermediate_size);
    let refusal = |change: &dyn Fn(&mut CudaWeights)| {
        let mut weights = mixq_weights(&device, &mut random_model(&config, 10), 8, |_, _| true);
        change(&mut weights);
        CudaLlama::from_weights(&device, config.clone(), weights).err().expect("refused").to_string()
    };
    let set = outlier_set(&device, h, 0);
    let err = refusal(&|w| {
        let weight = MixqWeight::random(&device, 4, (h, h), &set, 1).unwrap();
        w.layers[0].down = CudaLinear::Mixq { weight, threshold: f32::INFINITY }
    });
    assert!(err.contains(&format!("layer 0 down_proj: expected [{h}, {ffn}], got [{h}, {h}]")), "{err}");
    let err = refusal(&|w| w.layers.truncate(2));
    assert!(err.contains("2 layers"), "{err}");
}

// ---- models quantized by anyq's MixQ ----

/// Each block input's activation statistics, as `anyq quantize` gathers them.
#[derive(Default)]
struct Calibration(HashMap<(usize, LinearInput), ChannelStats>);

impl ActivationObserver for Calibration {
    fn observe(&mut self, layer: usize, input: LinearInput, x: &[f32], cols: usize) {
        self.0.entry((layer, input)).or_insert_with(|| ChannelStats::new(cols)).update(x);
    }
}

/// Quantizes `model`'s block layers with anyq's MixQ `method` (k_proj with `k_method`), calibrated
/// on `windows`, where `quantize(layer, input)` says so (the others stay float); Q/K rows in
/// Hugging Face's order first, as `anyq quantize` puts them.
fn quantize_with_mixq(
    model: &mut LlamaModel,
    (method, k_method): (&str, &str),
    windows: &[Vec<u32>],
    quantize: impl Fn(usize, LinearInput) -> bool,
) {
    let mut calibration = Calibration::default();
    for window in windows {
        model.forward_observed(window, &mut model.new_cache(), Some(&mut calibration)).unwrap();
    }
    model.use_neox_rope();
    let (method, k_method) = (MixQ::from_name(method).unwrap(), MixQ::from_name(k_method).unwrap());
    for layer in 0..model.config.num_layers {
        for input in LinearInput::ALL.into_iter().filter(|&input| quantize(layer, input)) {
            for &module in input.consumers() {
                let old = model.linear(layer, module).unwrap();
                let weight = old.dense_weight();
                let to_quantize = LayerToQuantize {
                    weight: &weight,
                    bias: old.bias(),
                    out_features: old.out_features(),
                    in_features: old.in_features(),
                    input_stats: calibration.0.get(&(layer, input)),
                };
                let by = if module == "self_attn.k_proj" { &k_method } else { &method };
                let quantized = by.quantize_layer(&to_quantize).unwrap();
                model.replace_linear(layer, module, Box::new(quantized)).unwrap();
            }
        }
    }
}

/// How much larger than the rest the two channels are that [`model_with_outliers`] plants in each
/// block input: MixQ's calibration marks both at its default threshold (3 times the median
/// channel's abs max), only the larger at [`K_THRESHOLD`] (the channels' own abs max vary by far
/// less than the margins, 5/3, 8/5 and 12/8).
const PLANTED_GAINS: [f32; 2] = [5.0, 12.0];
/// The threshold that k_proj is quantized with in the random models: its outlier set lacks the
/// smaller planted channel of its input, which q's and v's hold.
const K_THRESHOLD: &str = "t8";

/// `random_model_with_qk_gain(config, seed, 1.0)` with [`PLANTED_GAINS`] outlier channels in
/// every block input, other ones in every block. The weight columns that read them are √gain
/// smaller: their products stand out (a layer that lost its outlier columns would show) without
/// swamping the outputs, whose heavy tails would then put outliers everywhere.
fn model_with_outliers(config: &ModelConfig, seed: u64) -> LlamaModel {
    let c = config;
    let mut tensors = random_tensors(c, seed, 1.0);
    let (h, ffn, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (kv_width, group) = (c.num_kv_heads * d, c.num_heads / c.num_kv_heads);
    for i in 0..c.num_layers {
        // Multiplies row `row` of a `[rows, width]` tensor of block i by `factor`, or with
        // `column`, column `row`.
        let mut scale = |name: &str, width: usize, row: usize, column: bool, factor: f32| {
            let data = tensors.get_mut(&format!("model.layers.{i}.{name}")).unwrap().data_mut();
            match column {
                true => data.iter_mut().skip(row).step_by(width).for_each(|v| *v *= factor),
                false => data[row * width..(row + 1) * width].iter_mut().for_each(|v| *v *= factor),
            }
        };
        for (j, gain) in PLANTED_GAINS.into_iter().enumerate() {
            // q/k/v and gate/up read x / rms(x) · gamma: a larger gamma entry is an outlier channel.
            let attention_in = (17 * i + 5 + 55 * j) % h;
            scale("input_layernorm.weight", 1, attention_in, false, gain);
            for module in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
                scale(&format!("{module}.weight"), h, attention_in, true, 1.0 / gain.sqrt());
            }
            let mlp_in = (13 * i + 30 + 60 * j) % h;
            scale("post_attention_layernorm.weight", 1, mlp_in, false, gain);
            for module in ["mlp.gate_proj", "mlp.up_proj"] {
                scale(&format!("{module}.weight"), h, mlp_in, true, 1.0 / gain.sqrt());
            }
            // o_proj reads the attention output, a mix of the rows of v: a larger v row is an
            // outlier channel in each query head of its KV head.
            let v_row = (11 * i + 2 + 38 * j) % kv_width;
            scale("self_attn.v_proj.weight", h, v_row, false, gain);
            for head in v_row / d * group..(v_row / d + 1) * group {
                scale("self_attn.o_proj.weight", c.num_heads * d, head * d + v_row % d, true, 1.0 / gain.sqrt());
            }
            // down reads silu(gate) · up: a larger up row is an outlier channel.
            let up_row = (7 * i + 3 + 47 * j) % ffn;
            scale("mlp.up_proj.weight", h, up_row, false, gain);
            scale("mlp.down_proj.weight", ffn, up_row, true, 1.0 / gain.sqrt());
        }
    }
    load_random(c, tensors)
}

/// `count` windows of `len` random tokens.
fn random_windows(config: &ModelConfig, seed: u64, (count, len): (usize, usize)) -> Vec<Vec<u32>> {
    let mut rng = XorShift::new(seed);
    let vocab = config.vocab_size as u64;
    (0..count).map(|_| (0..len).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect()
}

/// Calibration windows for the random models: 512 tokens put each channel's abs max far enough
/// into its tail that no later token exceeds 3 times the median one outside the planted channels.
fn calibration_windows(config: &ModelConfig, seed: u64) -> Vec<Vec<u32>> {
    random_windows(config, seed, (8, 64))
}

/// The layer `module` of block `layer` as the MixQ layer it is.
fn mixq_layer<'a>(model: &'a LlamaModel, layer: usize, module: &str) -> Option<&'a MixQLinear> {
    model.linear(layer, module).unwrap().as_any().downcast_ref::<MixQLinear>()
}

/// Token rows that a forward pass of one token quantizes: one per MixQ layer input.
fn mixq_inputs(model: &LlamaModel) -> u64 {
    let blocks = 0..model.config.num_layers;
    let inputs =
        blocks.flat_map(|i| LinearInput::ALL.map(|input| mixq_layer(model, i, input.consumers()[0]).is_some()));
    inputs.filter(|&mixq| mixq).count() as u64
}

/// A random model with planted outliers quantized by anyq's MixQ `method`, saved as a checkpoint
/// and loaded back, as `anyq quantize` and `anyq generate` do.
fn mixq_checkpoint(config: &ModelConfig, method: &str, seed: u64) -> LlamaModel {
    let mut model = model_with_outliers(config, seed);
    let k_method = format!("{method}-{K_THRESHOLD}");
    quantize_with_mixq(&mut model, (method, &k_method), &calibration_windows(config, seed), |_, _| true);
    let dir = tempfile::tempdir().unwrap();
    let method = method_by_name(method).unwrap();
    save_quantized(&model, method.as_ref(), None, dir.path(), &|_, _| {}).unwrap();
    load_model(dir.path(), &|_, _| {}).unwrap().model
}

/// The GPU model of `cpu` (a model with MixQ layers, converted before the CPU runs it) against the
/// CPU over a prefill, one-token decode and batched decode. The planted outliers are the only
/// ones: the CPU's sets must not grow (then both compute with the same sets), and the GPU must
/// count no token over the thresholds. Both quantize activations to int8; the GPU's f16 ones flip
/// a few roundings, which moved the logits by up to 3.2% when emulated on the CPU (within
/// [`MIXQ_TOLERANCE`]); layers of one kind that lose their outlier columns move them by 13-31%.
fn check_mixq_model_against_cpu(device: &Arc<CudaDevice>, cpu: &LlamaModel, what: &str) {
    let gpu = CudaLlama::new(device, cpu).unwrap();
    let prompt = &random_windows(&cpu.config, 9, (1, 40))[0];
    let gpu_cache = prefill_and_step_against_cpu(&gpu, cpu, prompt, what);
    let rows = (prompt.len() as u64 + 1) * mixq_inputs(cpu);
    assert_eq!(gpu.mixq_counts(&gpu_cache).unwrap(), Some(MixqCounts { rows, over_threshold: 0 }), "{what}");
    check_batched_decode_against_cpu(device, &gpu, cpu, (3, 8), MIXQ_TOLERANCE, what);
    check_batched_decode_against_cpu(device, &gpu, cpu, (20, 24), MIXQ_TOLERANCE, what);
    for i in 0..cpu.config.num_layers {
        for module in LINEAR_MODULES {
            if let Some(layer) = mixq_layer(cpu, i, module) {
                let stats = layer.outlier_stats();
                assert_eq!(
                    stats.channels_now, stats.channels_at_calibration,
                    "{what}: layer {i} {module} grew its set"
                );
            }
        }
    }
}

/// [`qwen_like_config`] with an FFN of 104: anyq's int4 layers take inputs in multiples of 8.
fn qwen_like_config_for_int4() -> ModelConfig {
    ModelConfig { intermediate_size: 104, ..qwen_like_config() }
}

#[test]
fn mixq_checkpoints_run_on_the_gpu_as_on_the_cpu() {
    let Some(device) = device() else { return };
    for config in [llama_config(), qwen_like_config_for_int4()] {
        for method in ["mixq-w8a8", "mixq-w4a8-g128"] {
            let cpu = mixq_checkpoint(&config, method, 12);
            let what = format!("{:?} {method} checkpoint", config.architecture);
            // k_proj's set lacks a channel of q's: the GPU's q/k/v layer runs k's dequantized column
            // there, and counts with q's and v's threshold, the lower.
            for i in 0..config.num_layers {
                let [q, k] = ["self_attn.q_proj", "self_attn.k_proj"].map(|m| mixq_layer(&cpu, i, m).unwrap());
                let (q_set, k_set) = (q.outlier_set(), k.outlier_set());
                assert!(
                    k_set.len() < q_set.len(),
                    "{what}: layer {i}: k {:?}, q {:?}",
                    k_set.channels(),
                    q_set.channels()
                );
                assert!(k_set.channels().iter().all(|&c| q_set.contains(c)), "{what}: layer {i}");
            }
            check_mixq_model_against_cpu(&device, &cpu, &what);
        }
    }
}

#[test]
fn models_mixing_mixq_and_float_layers_run_on_the_gpu_as_on_the_cpu() {
    let Some(device) = device() else { return };
    let config = llama_config();
    let mut cpu = model_with_outliers(&config, 13);
    let windows = calibration_windows(&config, 13);
    // Every hand-over between FP16 and MixQ sub-layers, in memory (a checkpoint holds one method).
    quantize_with_mixq(&mut cpu, ("mixq-w8a8", "mixq-w8a8"), &windows, |i, input| {
        (i + input as usize).is_multiple_of(2)
    });
    assert!(mixq_inputs(&cpu) > 0 && mixq_layer(&cpu, 0, "self_attn.o_proj").is_none());
    check_mixq_model_against_cpu(&device, &cpu, "llama, MixQ mixed with float layers");
}

#[test]
fn the_gpu_counts_tokens_over_the_mixq_thresholds() {
    let Some(device) = device() else { return };
    let config = llama_config();
    let mut cpu = model_with_outliers(&config, 14);
    // A threshold of 1% of the median channel's abs max: every token has activations over it
    // outside the outlier set.
    let method = "mixq-w8a8-t0.01";
    quantize_with_mixq(&mut cpu, (method, method), &calibration_windows(&config, 14), |_, _| true);
    let gpu = CudaLlama::new(&device, &cpu).unwrap();
    let mut cache = gpu.new_cache(10).unwrap();
    gpu.forward_last(&[1, 2, 3, 4, 5, 6, 7], &mut cache).unwrap();
    gpu.forward_last(&[8], &mut cache).unwrap();
    let rows = 8 * mixq_inputs(&cpu);
    assert_eq!(gpu.mixq_counts(&cache).unwrap(), Some(MixqCounts { rows, over_threshold: rows }));
    // A model without MixQ layers has nothing to count.
    let fp16 = CudaLlama::new(&device, &random_model(&config, 14)).unwrap();
    assert_eq!(fp16.mixq_counts(&fp16.new_cache(4).unwrap()).unwrap(), None);
}

// ---- the end-to-end benchmark ----

/// `anyq bench e2e`'s whole path on a model small enough for any GPU: every variant at a batch
/// for the GEMVs and one for the tiled GEMMs, finite logits.
#[test]
fn the_decode_benchmark_runs_every_variant() {
    let Some(device) = device() else { return };
    let mut config = cuda_bench::llama3_8b();
    (config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers) = (512, 1024, 1000, 2);
    (config.num_heads, config.num_kv_heads) = (4, 2);
    let settings = DecodeBenchSettings {
        config,
        batches: vec![1, 40],
        ctx: 50,
        kinds: LinearKind::ALL.to_vec(),
        outlier_percent: 1.0,
        warmup: 1,
        steps: 2,
        seed: 3,
    };
    let timings = cuda_bench::bench_decode(&device, &settings, |_| {}).unwrap();
    assert_eq!(timings.len(), 6);
    for t in &timings {
        eprintln!("{:?} batch {}: {:.3} ms/step, {:.0} tok/s", t.kind, t.batch, t.step_ms, t.tokens_per_second());
        assert!(t.finite && t.step_ms > 0.0, "{t:?}");
    }
}

// ---- SmolLM2-135M-Instruct ----

fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("ANYQ_MODEL") {
        return PathBuf::from(path);
    }
    let assets = std::env::var_os("ANYQ_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    assets.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The real model, or `None` (skipped) where there is no GPU or no model file.
fn smollm2() -> Option<(Arc<CudaDevice>, &'static LoadedModel)> {
    let device = device()?;
    static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
    let loaded = MODEL.get_or_init(|| {
        let path = model_path();
        if !path.exists() {
            assert!(!require_gpu(), "{} is missing (set ANYQ_MODEL or run scripts/install-assets)", path.display());
            eprintln!("{} is missing: skipped", path.display());
            return None;
        }
        Some(load_model(&path, &|_, _| {}).unwrap())
    });
    Some((device, loaded.as_ref()?))
}

fn encode(loaded: &LoadedModel, text: &str) -> Vec<u32> {
    let tokenizer = &loaded.tokenizer.as_ref().expect("the GGUF holds its tokenizer").tokenizer;
    tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

/// Prompts whose last position's logits are compared: prose, code, and one past two prefill chunks.
fn logit_prompts() -> [String; 3] {
    let long = std::iter::repeat_n("Anne Elliot walked along the Cobb at Lyme, thinking of Captain Wentworth. ", 60)
        .collect::<String>();
    ["The capital of France is".into(), "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.".into(), long]
}

/// SmolLM2's chat template (ChatML) around a question, as `anyq generate --chat` renders it.
const CHAT_PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
    Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n\
    <|im_start|>assistant\n";

/// A story: perplexity's text, and MixQ's calibration text.
const STORY: &str = "It was the third week of October, and the rain had not stopped since the harvest. The miller's \
    daughter kept the accounts of the whole village in a narrow ledger, and she noticed before anyone else \
    that the numbers no longer agreed: more flour left the mill than grain arrived at it. She said nothing \
    to her father. Instead she began to walk the road to the market town each Thursday, counting the carts. ";

#[test]
fn smollm2_last_position_logits_match_the_cpu() {
    let Some((device, loaded)) = smollm2() else { return };
    let model = &loaded.model;
    let gpu = CudaLlama::new(&device, model).unwrap();
    for text in logit_prompts() {
        let ids = encode(loaded, &text);
        let want = model.forward_last(&ids, &mut model.new_cache()).unwrap();
        let got = gpu.forward_last(&ids, &mut gpu.new_cache(ids.len()).unwrap()).unwrap();
        let error = relative_l2(&got, &want);
        eprintln!("{} tokens: relative L2 error {error:.2e}, argmax {} / {}", ids.len(), argmax(&got), argmax(&want));
        assert!(error < LOGIT_TOLERANCE, "{} tokens: relative L2 error {error:.2e}", ids.len());
        assert_eq!(argmax(&got), argmax(&want), "{} tokens: the top token differs", ids.len());
    }
}

#[test]
fn smollm2_greedy_generation_matches_the_cpu_for_24_tokens() {
    let Some((device, loaded)) = smollm2() else { return };
    let model = &loaded.model;
    let prompt = encode(loaded, CHAT_PROMPT);
    const STEPS: usize = 24;
    let greedy = |forward: &mut dyn FnMut(&[u32]) -> Vec<f32>| {
        let mut tokens = Vec::new();
        let mut logits = forward(&prompt);
        while tokens.len() < STEPS {
            let next = argmax(&logits);
            tokens.push(next);
            logits = forward(&[next]);
        }
        tokens
    };
    let mut cpu_cache = model.new_cache();
    let cpu = greedy(&mut |t| model.forward_last(t, &mut cpu_cache).unwrap());
    let gpu_model = CudaLlama::new(&device, model).unwrap();
    let mut gpu_cache = gpu_model.new_cache(prompt.len() + STEPS + 1).unwrap();
    let gpu = greedy(&mut |t| gpu_model.forward_last(t, &mut gpu_cache).unwrap());
    let tokenizer = &loaded.tokenizer.as_ref().unwrap().tokenizer;
    eprintln!("CPU: {:?}", tokenizer.decode(&cpu, false).unwrap());
    eprintln!("GPU: {:?}", tokenizer.decode(&gpu, false).unwrap());
    assert_eq!(gpu, cpu);
}

/// Mean negative log-likelihood of each token given those before it, through `decoder`.
fn mean_nll(decoder: &mut impl Decoder, tokens: &[u32]) -> f64 {
    let mut total = 0.0;
    decoder
        .forward_all(tokens, &mut |i, logits| {
            if let Some(&next) = tokens.get(i + 1) {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let log_sum = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
                total += max + log_sum - logits[next as usize] as f64;
            }
        })
        .map_err(|e| e.to_string())
        .unwrap();
    total / (tokens.len() - 1) as f64
}

#[test]
fn smollm2_perplexity_matches_the_cpu() {
    let Some((device, loaded)) = smollm2() else { return };
    let tokens = encode(loaded, &STORY.repeat(4));
    let want = mean_nll(&mut CpuDecoder::new(&loaded.model), &tokens);
    let gpu = CudaLlama::new(&device, &loaded.model).unwrap();
    let got = mean_nll(&mut gpu.decoder(tokens.len()).unwrap(), &tokens);
    let (ppl_cpu, ppl_gpu) = (want.exp(), got.exp());
    eprintln!("{} tokens: perplexity CPU {ppl_cpu:.4}, GPU {ppl_gpu:.4}", tokens.len());
    // FP16 moves perplexity by well under 1%.
    assert!((ppl_gpu / ppl_cpu - 1.0).abs() < 1e-2, "perplexity CPU {ppl_cpu:.4}, GPU {ppl_gpu:.4}");
}

/// Between the GPU and the CPU, the real model quantized by MixQ moves its logits by up to 14%, as
/// emulated on the CPU (rounding to f16 what the GPU keeps in f16, outlier sets that do not grow):
/// each token's int8 scale follows its amax, so f16's 2⁻¹¹ changes it and flips a few percent of
/// the roundings, and the CPU's outlier sets grow as it runs (thousands of channels over these
/// prompts after calibration on 320 tokens) while the GPU's stay as converted. Layers of one kind
/// that lose their outlier columns move the logits by 90% to 500%.
const SMOLLM2_MIXQ_TOLERANCE: f64 = 0.3;

/// What greedy decoding may differ by: the GPU's pick, scored by the CPU's logits, is at most
/// this far below the CPU's best (the emulation moves single logits by up to 1.1; the GPU's pick
/// then trails by at most twice that, and a wrong model picks tokens many logits below).
const GREEDY_MAX_DEFICIT: f32 = 2.0;

#[test]
fn smollm2_quantized_by_mixq_runs_on_the_gpu_as_on_the_cpu() {
    let Some((device, float)) = smollm2() else { return };
    let windows: Vec<Vec<u32>> = encode(float, &STORY.repeat(4)).chunks_exact(64).map(<[u32]>::to_vec).collect();
    let prompt = encode(float, CHAT_PROMPT);
    for method in ["mixq-w8a8", "mixq-w4a8-g128"] {
        let mut loaded = load_model(&model_path(), &|_, _| {}).unwrap();
        quantize_with_mixq(&mut loaded.model, (method, method), &windows, |_, _| true);
        let cpu = &loaded.model;
        // Converted before the CPU runs, with the sets calibration chose.
        let gpu = CudaLlama::new(&device, cpu).unwrap();
        for text in logit_prompts() {
            let ids = encode(&loaded, &text);
            let want = cpu.forward_last(&ids, &mut cpu.new_cache()).unwrap();
            let got = gpu.forward_last(&ids, &mut gpu.new_cache(ids.len()).unwrap()).unwrap();
            let error = relative_l2(&got, &want);
            eprintln!(
                "{method}, {} tokens: relative L2 error {error:.2e}, argmax {} / {}",
                ids.len(),
                argmax(&got),
                argmax(&want)
            );
            assert!(error < SMOLLM2_MIXQ_TOLERANCE, "{method}, {} tokens: relative L2 error {error:.2e}", ids.len());
        }
        // Greedy decoding on the CPU, the GPU fed the same tokens: where the CPU's best leads by
        // less than the logits move, the GPU may pick the runner-up, nothing worse; most steps lead
        // by more (in the emulation the picks differed at most at 1 step of 24).
        const STEPS: usize = 24;
        let (mut cpu_cache, mut gpu_cache) = (cpu.new_cache(), gpu.new_cache(prompt.len() + STEPS).unwrap());
        let (mut want, mut got) =
            (cpu.forward_last(&prompt, &mut cpu_cache).unwrap(), gpu.forward_last(&prompt, &mut gpu_cache).unwrap());
        let (mut tokens, mut agreeing) = (Vec::new(), 0);
        for step in 0..STEPS {
            let (best, pick) = (argmax(&want), argmax(&got));
            let deficit = want[best as usize] - want[pick as usize];
            assert!(
                deficit <= GREEDY_MAX_DEFICIT,
                "{method}, step {step}: the GPU picks {pick}, {deficit} below the CPU's {best}"
            );
            agreeing += usize::from(pick == best);
            tokens.push(best);
            if step + 1 < STEPS {
                want = cpu.forward_last(&[best], &mut cpu_cache).unwrap();
                got = gpu.forward_last(&[best], &mut gpu_cache).unwrap();
            }
        }
        let tokenizer = &loaded.tokenizer.as_ref().unwrap().tokenizer;
        eprintln!(
            "{method}: {agreeing} of {STEPS} greedy picks agree; CPU: {:?}",
            tokenizer.decode(&tokens, false).unwrap()
        );
        assert!(
            agreeing >= STEPS * 3 / 4,
            "{method}: the GPU's greedy picks agree with the CPU's at {agreeing} of {STEPS} steps"
        );
        let counts = gpu.mixq_counts(&gpu_cache).unwrap().unwrap();
        eprintln!("{method}: {} of {} token rows over the thresholds", counts.over_threshold, counts.rows);
    }
}
