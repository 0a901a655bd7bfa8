//! A tiny random-weight LLaMA written both as a Hugging Face folder and as a llama.cpp-style
//! GGUF: the two loaders must give the same logits, the KV cache must reproduce a full
//! prefill, and damaged files must give errors that name what is wrong.

use std::collections::HashMap;
use std::path::Path;

use anyq_models::loader::gguf::GgufWriter;
use anyq_models::loader::gguf_meta::MetaValue;
use anyq_models::{load_model, LoadError, LoadedModel};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

const VOCAB: usize = 64;
const HIDDEN: usize = 32;
const FFN: usize = 48;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;

struct Weights {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn pseudo_random(n: usize, seed: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (((i * 7 + seed * 131) as f32 * 12.9898).sin() * 43758.547).fract() * scale).collect()
}

fn tiny_weights(qkv_bias: bool) -> Weights {
    let mut tensors = Vec::new();
    let mut seed = 0;
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        seed += 1;
        let n = shape.iter().product();
        let data = pseudo_random(n, seed, scale).into_iter().map(|v| v + offset).collect();
        tensors.push((name, shape, data));
    };
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 1.0, 0.0);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        add(format!("{p}.self_attn.q_proj.weight"), vec![HEADS * HEAD_DIM, HIDDEN], 0.4, 0.0);
        add(format!("{p}.self_attn.k_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.4, 0.0);
        add(format!("{p}.self_attn.v_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.4, 0.0);
        if qkv_bias {
            add(format!("{p}.self_attn.q_proj.bias"), vec![HEADS * HEAD_DIM], 0.3, 0.0);
            add(format!("{p}.self_attn.k_proj.bias"), vec![KV_HEADS * HEAD_DIM], 0.3, 0.0);
            add(format!("{p}.self_attn.v_proj.bias"), vec![KV_HEADS * HEAD_DIM], 0.3, 0.0);
        }
        add(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HEADS * HEAD_DIM], 0.3, 0.0);
        add(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        add(format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN], 0.3, 0.0);
        add(format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN], 0.3, 0.0);
        add(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN], 0.3, 0.0);
    }
    add("model.norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
    add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.5, 0.0);
    Weights { tensors }
}

fn hf_config(arch: &str, qkv_bias: bool) -> String {
    format!(
        r#"{{"model_type":"{arch}","vocab_size":{VOCAB},"hidden_size":{HIDDEN},"intermediate_size":{FFN},
        "num_hidden_layers":{LAYERS},"num_attention_heads":{HEADS},"num_key_value_heads":{KV_HEADS},
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":128,"attention_bias":{qkv_bias}}}"#
    )
}

fn write_hf_folder(dir: &Path, weights: &Weights, arch: &str, qkv_bias: bool, dtype: Dtype) {
    std::fs::write(dir.join("config.json"), hf_config(arch, qkv_bias)).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .tensors
        .iter()
        .map(|(name, shape, data)| {
            let raw = match dtype {
                Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::BF16 => data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
                _ => unreachable!("test writes F32 or BF16"),
            };
            (name.clone(), shape.clone(), raw)
        })
        .collect();
    let views: HashMap<String, TensorView> =
        bytes.iter().map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// llama.cpp's converter permutes Q and K rows of each head from "rotate half" order to adjacent
/// pairs: new row 2i + s = old row s·d/2 + i.
fn permute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..HEAD_DIM / 2 {
            for s in 0..2 {
                let from = (h * HEAD_DIM + s * HEAD_DIM / 2 + i) * cols;
                let to = (h * HEAD_DIM + 2 * i + s) * cols;
                out[to..to + cols].copy_from_slice(&data[from..from + cols]);
            }
        }
    }
    out
}

fn gguf_writer(weights: &Weights, arch: &str) -> GgufWriter {
    let mut w = GgufWriter::default();
    let u32v = |v: usize| MetaValue::U32(v as u32);
    w.metadata("general.architecture", MetaValue::String(arch.into()))
        .metadata(&format!("{arch}.embedding_length"), u32v(HIDDEN))
        .metadata(&format!("{arch}.feed_forward_length"), u32v(FFN))
        .metadata(&format!("{arch}.block_count"), u32v(LAYERS))
        .metadata(&format!("{arch}.attention.head_count"), u32v(HEADS))
        .metadata(&format!("{arch}.attention.head_count_kv"), u32v(KV_HEADS))
        .metadata(&format!("{arch}.attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5))
        .metadata(&format!("{arch}.rope.freq_base"), MetaValue::F32(10000.0))
        .metadata(&format!("{arch}.context_length"), u32v(128));
    for (name, shape, data) in &weights.tensors {
        let gguf = gguf_name(name);
        let data = match (arch, name.contains("q_proj.weight"), name.contains("k_proj.weight")) {
            ("llama", true, _) => permute_rows(data, HEADS, HIDDEN),
            ("llama", _, true) => permute_rows(data, KV_HEADS, HIDDEN),
            _ => data.clone(),
        };
        w.tensor(&gguf, shape, data);
    }
    w
}

fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let rest = rest
        .replace("self_attn.q_proj", "attn_q")
        .replace("self_attn.k_proj", "attn_k")
        .replace("self_attn.v_proj", "attn_v")
        .replace("self_attn.o_proj", "attn_output")
        .replace("mlp.gate_proj", "ffn_gate")
        .replace("mlp.up_proj", "ffn_up")
        .replace("mlp.down_proj", "ffn_down")
        .replace("post_attention_layernorm", "ffn_norm")
        .replace("input_layernorm", "attn_norm");
    format!("blk.{layer}.{rest}")
}

fn load(path: &Path) -> Result<LoadedModel, LoadError> {
    load_model(path, &|_, _| {})
}

const TOKENS: [u32; 11] = [1, 5, 9, 33, 2, 63, 0, 17, 17, 40, 8];

fn all_logits(loaded: &LoadedModel, tokens: &[u32]) -> Vec<f32> {
    let model = &loaded.model;
    let hidden = model.forward_hidden(tokens, &mut model.new_cache()).unwrap();
    model.logits(&hidden)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn gguf_with_permuted_qk_matches_hf_folder() {
    for (arch, bias) in [("llama", false), ("qwen2", true)] {
        let dir = tempfile::tempdir().unwrap();
        let weights = tiny_weights(bias);
        write_hf_folder(dir.path(), &weights, arch, bias, Dtype::F32);
        let gguf_path = dir.path().join("tiny.gguf");
        gguf_writer(&weights, arch).write(&gguf_path).unwrap();

        let hf = load(dir.path()).unwrap();
        let gguf = load(&gguf_path).unwrap();
        assert_eq!(gguf.model.config.qkv_bias, bias);
        assert!(gguf.tokenizer.is_none(), "no tokenizer metadata was written");
        let (a, b) = (all_logits(&hf, &TOKENS), all_logits(&gguf, &TOKENS));
        let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.1, "logits should not be trivially small");
        // Same weights, same f32 arithmetic but RoPE pairs in another order: rounding only.
        assert!(max_abs_diff(&a, &b) < 1e-5 * scale.max(1.0), "{arch}: diff {}", max_abs_diff(&a, &b));
    }
}

#[test]
fn bf16_folder_loads_and_differs_only_by_bf16_rounding() {
    let dir32 = tempfile::tempdir().unwrap();
    let dir16 = tempfile::tempdir().unwrap();
    let weights = tiny_weights(false);
    write_hf_folder(dir32.path(), &weights, "llama", false, Dtype::F32);
    write_hf_folder(dir16.path(), &weights, "llama", false, Dtype::BF16);
    let (a, b) = (all_logits(&load(dir32.path()).unwrap(), &TOKENS), all_logits(&load(dir16.path()).unwrap(), &TOKENS));
    let d = max_abs_diff(&a, &b);
    assert!(d > 0.0 && d < 0.1, "bf16 rounding should change logits a little, not a lot: {d}");
}

#[test]
fn kv_cache_decode_equals_full_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    gguf_writer(&tiny_weights(false), "llama").write(&path).unwrap();
    let loaded = load(&path).unwrap();
    let model = &loaded.model;
    let full = all_logits(&loaded, &TOKENS);
    // Prefill 4 tokens, then decode the rest one at a time: every step's logits must equal the
    // corresponding row of the full prefill.
    let mut cache = model.new_cache();
    let mut incremental = model.logits(&model.forward_hidden(&TOKENS[..4], &mut cache).unwrap());
    for &t in &TOKENS[4..] {
        incremental.extend(model.forward_last(&[t], &mut cache).unwrap());
    }
    assert_eq!(cache.len(), TOKENS.len());
    assert!(max_abs_diff(&full, &incremental) < 1e-5, "diff {}", max_abs_diff(&full, &incremental));
}

#[test]
fn bad_tokens_and_context_overflow_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    gguf_writer(&tiny_weights(false), "llama").write(&path).unwrap();
    let loaded = load(&path).unwrap();
    let model = &loaded.model;
    let err = model.forward_hidden(&[1, VOCAB as u32], &mut model.new_cache()).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let err = model.forward_hidden(&vec![1; 129], &mut model.new_cache()).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
}

fn error_of(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    match load(&path) {
        Ok(_) => panic!("a damaged file loaded"),
        Err(e) => e.to_string(),
    }
}

/// Offset of a tensor-table entry's fields, found by the name's bytes.
fn field_after_name(bytes: &[u8], name: &str) -> usize {
    let at = bytes.windows(name.len()).position(|w| w == name.as_bytes()).unwrap();
    at + name.len()
}

#[test]
fn damaged_gguf_files_give_errors_naming_the_problem() {
    let good = gguf_writer(&tiny_weights(false), "llama").to_bytes();

    for cut in [0, 3, 10, 30, 200, good.len() / 2, good.len() - 1] {
        let e = error_of(&good[..cut]);
        assert!(e.contains("bad.gguf") && (e.contains("truncated") || e.contains("magic")), "cut at {cut}: {e}");
    }

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(error_of(&bad_magic).contains("not a GGUF file"));

    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(error_of(&v1).contains("version 1"));

    // Tensor entry: name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    let name = "blk.1.ffn_up.weight";
    let dims_at = field_after_name(&good, name) + 4;
    let type_at = dims_at + 2 * 8;

    let mut bogus_offset = good.clone();
    bogus_offset[type_at + 4..type_at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = error_of(&bogus_offset);
    assert!(e.contains(name) && e.contains("past the end"), "{e}");

    let mut bad_type = good.clone();
    bad_type[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = error_of(&bad_type);
    assert!(e.contains(name) && e.contains("type id 99"), "{e}");

    let mut huge_count = good.clone();
    huge_count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(error_of(&huge_count).contains("tensor count"));
}

#[test]
fn wrong_architecture_shape_or_missing_tensor_are_errors() {
    let weights = tiny_weights(false);
    let e = error_of(&gguf_writer(&weights, "gpt2").to_bytes());
    assert!(e.contains("unsupported architecture") && e.contains("gpt2"), "{e}");

    let mut missing = Weights { tensors: weights.tensors.clone() };
    missing.tensors.retain(|(n, _, _)| n != "model.layers.1.mlp.down_proj.weight");
    let e = error_of(&gguf_writer(&missing, "llama").to_bytes());
    assert!(e.contains("blk.1.ffn_down.weight") || e.contains("model.layers.1.mlp.down_proj.weight"), "{e}");
    assert!(e.contains("missing"), "{e}");

    let mut wrong_shape = Weights { tensors: weights.tensors.clone() };
    let entry = wrong_shape.tensors.iter_mut().find(|(n, _, _)| n == "model.layers.0.mlp.up_proj.weight").unwrap();
    entry.1 = vec![FFN / 2, HIDDEN * 2];
    let e = error_of(&gguf_writer(&wrong_shape, "llama").to_bytes());
    assert!(e.contains("up_proj") && e.contains("expected shape [48, 32]"), "{e}");
}

#[test]
fn damaged_hf_folders_give_errors() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny_weights(false);
    write_hf_folder(dir.path(), &weights, "llama", false, Dtype::F32);
    let file = dir.path().join("model.safetensors");
    let good = std::fs::read(&file).unwrap();

    std::fs::write(&file, &good[..good.len() / 2]).unwrap();
    let e = load(dir.path()).err().expect("truncated safetensors loaded").to_string();
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(&file, b"\xff\xff\xff\xff\xff\xff\xff\x7f{}").unwrap();
    assert!(load(dir.path()).is_err());

    std::fs::remove_file(&file).unwrap();
    let e = load(dir.path()).err().expect("missing weights loaded").to_string();
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(dir.path().join("config.json"), hf_config("baichuan", false)).unwrap();
    let e = load(dir.path()).err().expect("unknown architecture loaded").to_string();
    assert!(e.contains("baichuan"), "{e}");
}

#[test]
fn hf_integer_dtype_is_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), hf_config("llama", false)).unwrap();
    let raw = vec![0u8; VOCAB * HIDDEN * 4];
    let view = TensorView::new(Dtype::I32, vec![VOCAB, HIDDEN], &raw).unwrap();
    safetensors::serialize_to_file([("model.embed_tokens.weight", view)], None, &dir.path().join("model.safetensors"))
        .unwrap();
    let e = load(dir.path()).err().expect("I32 weights loaded").to_string();
    assert!(e.contains("model.embed_tokens.weight") && e.contains("I32"), "{e}");
}

#[test]
fn sharded_hf_folder_matches_single_file() {
    let single = tempfile::tempdir().unwrap();
    let sharded = tempfile::tempdir().unwrap();
    let weights = tiny_weights(false);
    write_hf_folder(single.path(), &weights, "llama", false, Dtype::F32);
    std::fs::write(sharded.path().join("config.json"), hf_config("llama", false)).unwrap();
    // Two shards, split as transformers does by size, and the index that names each tensor's shard.
    let (first, second) = weights.tensors.split_at(weights.tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, tensors) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)]
    {
        let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), d.iter().flat_map(|v| v.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, TensorView)> =
            raw.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &sharded.path().join(shard)).unwrap();
        for (n, _, _) in tensors {
            weight_map.insert(n.clone(), shard.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(sharded.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    let (a, b) =
        (all_logits(&load(single.path()).unwrap(), &TOKENS), all_logits(&load(sharded.path()).unwrap(), &TOKENS));
    assert_eq!(a, b, "the same weights from one file or two shards");

    std::fs::remove_file(sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load(sharded.path()).err().expect("a missing shard loaded").to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn observer_sees_each_linear_input_as_the_block_computes_it() {
    use anyq_models::{ActivationObserver, LinearInput};

    #[derive(Default)]
    struct Recorder(Vec<(usize, LinearInput, Vec<f32>, usize)>);
    impl ActivationObserver for Recorder {
        fn observe(&mut self, layer: usize, input: LinearInput, x: &[f32], cols: usize) {
            self.0.push((layer, input, x.to_vec(), cols));
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let weights = tiny_weights(false);
    gguf_writer(&weights, "llama").write(&path).unwrap();
    let loaded = load(&path).unwrap();
    let model = &loaded.model;
    let mut recorder = Recorder::default();
    let hidden = model.forward_observed(&TOKENS[..3], &mut model.new_cache(), Some(&mut recorder)).unwrap();
    assert_eq!(
        hidden,
        model.forward_hidden(&TOKENS[..3], &mut model.new_cache()).unwrap(),
        "observing changes nothing"
    );

    let order: Vec<(usize, LinearInput, usize)> = recorder.0.iter().map(|(l, i, _, c)| (*l, *i, *c)).collect();
    let expected: Vec<(usize, LinearInput, usize)> = (0..LAYERS)
        .flat_map(|l| {
            [
                (l, LinearInput::Attention, HIDDEN),
                (l, LinearInput::AttentionOutput, HEADS * HEAD_DIM),
                (l, LinearInput::Mlp, HIDDEN),
                (l, LinearInput::MlpDown, FFN),
            ]
        })
        .collect();
    assert_eq!(order, expected);

    // Layer 0's attention input is RMSNorm(embedding rows) · norm weight, computed here by hand.
    let tensor = |name: &str| &weights.tensors.iter().find(|(n, _, _)| n == name).unwrap().2;
    let (embed, norm) = (tensor("model.embed_tokens.weight"), tensor("model.layers.0.input_layernorm.weight"));
    let observed = &recorder.0[0].2;
    for (t, &id) in TOKENS[..3].iter().enumerate() {
        let row = &embed[id as usize * HIDDEN..(id as usize + 1) * HIDDEN];
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / HIDDEN as f32 + 1e-5).sqrt();
        for j in 0..HIDDEN {
            let expected = row[j] / rms * norm[j];
            assert!((observed[t * HIDDEN + j] - expected).abs() < 1e-5, "token {t} channel {j}");
        }
    }
}

#[test]
fn linear_layers_can_be_read_and_replaced_by_name() {
    use anyq_core::DenseLinear;
    use anyq_models::LINEAR_MODULES;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    gguf_writer(&tiny_weights(false), "llama").write(&path).unwrap();
    let mut loaded = load(&path).unwrap();
    let before = all_logits(&loaded, &TOKENS);
    // Swapping every layer for a dense copy of its own weight changes nothing.
    for layer in 0..LAYERS {
        for module in LINEAR_MODULES {
            let old = loaded.model.linear(layer, module).unwrap();
            let (n, k) = (old.out_features(), old.in_features());
            let copy = DenseLinear::new(old.dense_weight(), None, n, k);
            loaded.model.replace_linear(layer, module, Box::new(copy)).unwrap();
        }
    }
    assert_eq!(all_logits(&loaded, &TOKENS), before);
    // A zero down_proj in layer 1 changes the output.
    let zero = DenseLinear::new(vec![0.0; HIDDEN * FFN], None, HIDDEN, FFN);
    loaded.model.replace_linear(1, "mlp.down_proj", Box::new(zero)).unwrap();
    assert_ne!(all_logits(&loaded, &TOKENS), before);

    let wrong = DenseLinear::new(vec![0.0; FFN * FFN], None, FFN, FFN);
    let e = loaded.model.replace_linear(0, "mlp.down_proj", Box::new(wrong)).err().unwrap();
    assert!(e.contains("cannot replace [32, 48]"), "{e}");
    let e =
        loaded.model.replace_linear(0, "mlp.nothing", Box::new(DenseLinear::new(vec![0.0], None, 1, 1))).err().unwrap();
    assert!(e.contains("no linear layer mlp.nothing"), "{e}");
    assert!(loaded.model.linear(LAYERS, "mlp.up_proj").is_none());
}

#[test]
fn producers_scan_the_activation_for_the_layers_that_ask() {
    use std::sync::Mutex;

    use anyq_core::cpu::scan_activations;
    use anyq_core::{ActivationScan, ChannelSet, DenseLinear, Linear, ScanRequest};
    use anyq_models::LINEAR_MODULES;

    /// A dense layer that asks for `request` and records each input with the scan it came with.
    struct Asking {
        dense: DenseLinear,
        request: Option<ScanRequest>,
        calls: Mutex<Vec<(Vec<f32>, Option<ActivationScan>)>>,
    }
    impl Linear for Asking {
        fn in_features(&self) -> usize {
            self.dense.in_features()
        }
        fn out_features(&self) -> usize {
            self.dense.out_features()
        }
        fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
            self.calls.lock().unwrap().push((x.to_vec(), None));
            self.dense.forward(x, m, out);
        }
        fn input_scan(&self) -> Option<ScanRequest> {
            self.request.clone()
        }
        fn forward_scanned(&self, x: &[f32], m: usize, scan: &ActivationScan, out: &mut [f32]) {
            self.calls.lock().unwrap().push((x.to_vec(), Some(scan.clone())));
            self.dense.forward(x, m, out);
        }
        fn weight_bytes(&self) -> usize {
            self.dense.weight_bytes()
        }
        fn weight_row(&self, row: usize, out: &mut [f32]) {
            self.dense.weight_row(row, out);
        }
        fn bias(&self) -> Option<&[f32]> {
            None
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    gguf_writer(&tiny_weights(false), "llama").write(&path).unwrap();
    let mut loaded = load(&path).unwrap();
    let before = all_logits(&loaded, &TOKENS);
    // Equal requests built separately, as MixQ's q/k/v build theirs.
    let asks = |k: usize, threshold: f32| Some(ScanRequest::new(ChannelSet::new(k, &[1, 6, k - 2]), threshold));
    let (h, f) = (HIDDEN, FFN);
    // In LINEAR_MODULES order. Layer 0: q/k/v share one scan, gate asks and up does not.
    // Layer 1: q and v ask different scans of one activation, k none.
    let requests = [
        [asks(h, 1.5), asks(h, 1.5), asks(h, 1.5), None, asks(h, 1.0), None, asks(f, 0.3)],
        [asks(h, 1.2), None, asks(h, 1.7), None, None, asks(h, 1.0), asks(f, 0.2)],
    ];
    for (layer, requests) in requests.iter().enumerate() {
        for (module, request) in LINEAR_MODULES.into_iter().zip(requests) {
            let old = loaded.model.linear(layer, module).unwrap();
            let dense = DenseLinear::new(old.dense_weight(), None, old.out_features(), old.in_features());
            let asking = Asking { dense, request: request.clone(), calls: Mutex::default() };
            loaded.model.replace_linear(layer, module, Box::new(asking)).unwrap();
        }
    }
    assert_eq!(all_logits(&loaded, &TOKENS), before, "scans change no output");

    let mut crossings = 0;
    for (layer, requests) in requests.iter().enumerate() {
        for (module, request) in LINEAR_MODULES.into_iter().zip(requests) {
            let asking = loaded.model.linear(layer, module).unwrap().as_any().downcast_ref::<Asking>().unwrap();
            let calls = asking.calls.lock().unwrap();
            assert_eq!(calls.len(), 1, "layer {layer} {module}");
            let (x, scan) = &calls[0];
            let expected = request.as_ref().map(|r| scan_activations(x, x.len() / r.channels(), r));
            assert_eq!(scan, &expected, "layer {layer} {module}");
            crossings += scan.as_ref().map_or(0, |s| s.outliers.len());
        }
    }
    assert!(crossings > 0, "some activation must cross its threshold");
}
