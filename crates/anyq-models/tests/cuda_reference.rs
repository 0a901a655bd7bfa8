//! The FP16 model on the GPU against the CPU model: small random models that take every branch
//! of the config (both RoPE layouts, frequency factors, QKV biases, tied and untied outputs,
//! prompts longer than a prefill chunk), and the real SmolLM2-135M-Instruct: the last position's
//! logits agree to f16 accuracy and greedy decoding picks the same tokens.
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
use anyq_models::cuda::{CudaBatchCache, CudaLayer, CudaLinear, CudaLlama, CudaModelError, CudaWeights, PREFILL_CHUNK};
use anyq_models::cuda_bench::{self, DecodeBenchSettings, LinearKind};
use anyq_models::loader::WeightSource;
use anyq_models::{
    load_model, Architecture, CpuDecoder, Decoder, ForwardError, LlamaModel, LoadError, LoadedModel, ModelConfig,
};
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
    LlamaModel::load(c.clone(), &RandomWeights(tensors), None, &|_, _| {}).unwrap()
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
    assert!(err.to_string().contains("only FP16 models run on the GPU"), "{err}");
    assert!(err.to_string().contains("layer 1 mlp.down_proj"), "{err}");
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

/// `percent`% of `k` channels as outliers, as the benchmark spreads them.
fn outlier_set(device: &CudaDevice, k: usize) -> Arc<OutlierSet> {
    OutlierSet::new(device, k, &cuda_bench::spread_outliers(k, 3.0)).unwrap()
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
    // One outlier set per input width, as every layer's input of a kind must share it.
    let sets = [outlier_set(device, h), outlier_set(device, q_width), outlier_set(device, h), outlier_set(device, ffn)];
    let fused = [
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"][..],
        &["self_attn.o_proj"],
        &["mlp.gate_proj", "mlp.up_proj"],
        &["mlp.down_proj"],
    ];
    let mut layers = Vec::new();
    for i in 0..c.num_layers {
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
            linears.push(CudaLinear::Mixq(weight));
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

/// Prefill (the tiled MixQ GEMMs), one-token decode (the GEMVs) and batched decode of few and
/// many sequences, against the CPU model with MixQ's weights.
fn check_mixq_against_cpu(device: &Arc<CudaDevice>, config: &ModelConfig, bits: u32, mixed: bool, what: &str) {
    let mut cpu = random_model_with_qk_gain(config, 8, 1.0);
    // Mixed: the layers alternate, so every hand-over between FP16 and MixQ sub-layers occurs.
    let gpu = mixq_model(device, &mut cpu, bits, |i, j| !mixed || (i + j) % 2 == 0);
    let vocab = config.vocab_size as u64;
    let mut rng = XorShift::new(9);
    let prompt: Vec<u32> = (0..40).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let mut gpu_cache = gpu.new_cache(prompt.len() + 1).unwrap();
    let mut cpu_cache = cpu.new_cache();
    for (step, tokens) in [&prompt[..], &prompt[..1]].into_iter().enumerate() {
        let want = cpu.forward_last(tokens, &mut cpu_cache).unwrap();
        let error = relative_l2(&gpu.forward_last(tokens, &mut gpu_cache).unwrap(), &want);
        eprintln!("{what}, {} tokens: relative L2 error {error:.2e}", tokens.len());
        assert!(error < MIXQ_TOLERANCE, "{what}, step {step}: relative L2 error {error:.2e}");
    }
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
fn weights_of_the_wrong_shape_or_outliers_are_refused() {
    let Some(device) = device() else { return };
    let config = llama_config();
    let (h, q_width, ffn) = (config.hidden_size, config.num_heads * config.head_dim, config.intermediate_size);
    let refusal = |change: &dyn Fn(&mut CudaWeights)| {
        let mut weights = mixq_weights(&device, &mut random_model(&config, 10), 8, |_, _| true);
        change(&mut weights);
        CudaLlama::from_weights(&device, config.clone(), weights).err().expect("refused").to_string()
    };
    // Layer 1's o_proj with outlier channels of its own: its input is quantized for layer 0's.
    let other = OutlierSet::new(&device, q_width, &[1, 2, 3]).unwrap();
    let err = refusal(&|w| {
        w.layers[1].o_proj = CudaLinear::Mixq(MixqWeight::random(&device, 8, (h, q_width), &other, 1).unwrap())
    });
    assert!(err.contains("layer 1 o_proj") && err.contains("outlier channels"), "{err}");
    let set = outlier_set(&device, h);
    let err =
        refusal(&|w| w.layers[0].down = CudaLinear::Mixq(MixqWeight::random(&device, 4, (h, h), &set, 1).unwrap()));
    assert!(err.contains(&format!("layer 0 down_proj: expected [{h}, {ffn}], got [{h}, {h}]")), "{err}");
    let err = refusal(&|w| w.layers.truncate(2));
    assert!(err.contains("2 layers"), "{err}");
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

#[test]
fn smollm2_last_position_logits_match_the_cpu() {
    let Some((device, loaded)) = smollm2() else { return };
    let model = &loaded.model;
    let gpu = CudaLlama::new(&device, model).unwrap();
    let long = std::iter::repeat_n("Anne Elliot walked along the Cobb at Lyme, thinking of Captain Wentworth. ", 60)
        .collect::<String>();
    for text in ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.", &long] {
        let ids = encode(loaded, text);
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
    // SmolLM2's chat template (ChatML) around a question, as `anyq generate --chat` renders it.
    let prompt = encode(
        loaded,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n<|im_start|>assistant\n",
    );
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
    let text = "It was the third week of October, and the rain had not stopped since the harvest. The miller's \
        daughter kept the accounts of the whole village in a narrow ledger, and she noticed before anyone else \
        that the numbers no longer agreed: more flour left the mill than grain arrived at it. She said nothing \
        to her father. Instead she began to walk the road to the market town each Thursday, counting the carts. ";
    let tokens = encode(loaded, &text.repeat(4));
    let want = mean_nll(&mut CpuDecoder::new(&loaded.model), &tokens);
    let gpu = CudaLlama::new(&device, &loaded.model).unwrap();
    let got = mean_nll(&mut gpu.decoder(tokens.len()).unwrap(), &tokens);
    let (ppl_cpu, ppl_gpu) = (want.exp(), got.exp());
    eprintln!("{} tokens: perplexity CPU {ppl_cpu:.4}, GPU {ppl_gpu:.4}", tokens.len());
    // FP16 moves perplexity by well under 1%.
    assert!((ppl_gpu / ppl_cpu - 1.0).abs() < 1e-2, "perplexity CPU {ppl_cpu:.4}, GPU {ppl_gpu:.4}");
}
