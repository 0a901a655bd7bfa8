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
use anyq_core::{Linear, Tensor};
use anyq_cuda::CudaDevice;
use anyq_models::cuda::{CudaLlama, CudaModelError, PREFILL_CHUNK};
use anyq_models::loader::WeightSource;
use anyq_models::{
    load_model, Architecture, CpuDecoder, Decoder, ForwardError, LlamaModel, LoadError, LoadedModel, ModelConfig,
};

fn require_gpu() -> bool {
    std::env::var_os("ANYQ_REQUIRE_GPU").is_some()
}

fn device() -> Option<Arc<CudaDevice>> {
    if CudaDevice::available() {
        return Some(CudaDevice::open(0).expect("a GPU is present but cannot be opened"));
    }
    assert!(!require_gpu(), "ANYQ_REQUIRE_GPU is set but no GPU is usable");
    eprintln!("no CUDA GPU: skipped");
    None
}

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
            // q and k twice as large: attention that is peaked, not flat.
            let gain = if module == "self_attn.q_proj" || module == "self_attn.k_proj" { 2.0 } else { 1.0 };
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
