//! The Hugging Face folder path on the real model: SmolLM2's GGUF is written out as a Hugging
//! Face folder (f32 safetensors with Q/K rows back in "rotate half" order, tokenizer.json,
//! tokenizer_config.json, generation_config.json), and loading that folder must give the same
//! model, tokenizer, chat template and stop tokens as loading the GGUF.

use std::path::{Path, PathBuf};

use anyq_models::loader::gguf::GgufFile;
use anyq_models::{load_model, LoadedModel};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn gguf_path() -> PathBuf {
    let assets = std::env::var_os("ANYQ_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let path = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/install-assets first", path.display());
    path
}

/// llama.cpp's names back to Hugging Face's (written independently of the loader's table).
fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").unwrap();
    let (layer, module) = rest.split_once('.').unwrap();
    let module = match module {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        other => panic!("unexpected tensor {other}"),
    };
    format!("model.layers.{layer}.{module}")
}

/// Undoes llama.cpp's Q/K permutation: GGUF row 2i + s of a head is Hugging Face row s·d/2 + i.
fn unpermute_rows(data: &[f32], rows: usize, cols: usize, head_dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for h in 0..rows / head_dim {
        for i in 0..head_dim / 2 {
            for s in 0..2 {
                let from = (h * head_dim + 2 * i + s) * cols;
                let to = (h * head_dim + s * head_dim / 2 + i) * cols;
                out[to..to + cols].copy_from_slice(&data[from..from + cols]);
            }
        }
    }
    out
}

fn write_hf_folder(gguf: &GgufFile, from_gguf: &LoadedModel, dir: &Path) {
    let c = &from_gguf.model.config;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for info in &gguf.tensors {
        let tensor = gguf.tensor_f32(&info.name).unwrap();
        let shape = tensor.shape().to_vec();
        let data = if info.name.ends_with("attn_q.weight") || info.name.ends_with("attn_k.weight") {
            unpermute_rows(tensor.data(), shape[0], shape[1], c.head_dim)
        } else {
            tensor.into_data()
        };
        tensors.push((hf_name(&info.name), shape, data.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();

    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": true, "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let bundle = from_gguf.tokenizer.as_ref().unwrap();
    bundle.tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    let token = |id: Option<u32>| bundle.tokenizer.id_to_token(id.unwrap()).unwrap();
    let tokenizer_config = serde_json::json!({
        "bos_token": token(bundle.special.bos), "eos_token": token(bundle.special.eos),
        "chat_template": bundle.chat_template.as_ref().unwrap(),
    });
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"bos_token_id": 1, "eos_token_id": [2]}"#).unwrap();
}

#[test]
fn hf_folder_written_from_the_gguf_loads_to_the_same_model() {
    let path = gguf_path();
    let gguf = GgufFile::open(&path).unwrap();
    let from_gguf = load_model(&path, &|_, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_hf_folder(&gguf, &from_gguf, dir.path());
    let from_hf = load_model(dir.path(), &|_, _| {}).unwrap();

    let (a, b) = (from_gguf.tokenizer.as_ref().unwrap(), from_hf.tokenizer.as_ref().unwrap());
    let text = "In 1813 there were 12345 books.<|im_end|> café";
    let ids = a.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(b.tokenizer.encode(text, false).unwrap().get_ids(), &ids[..]);
    assert_eq!(a.chat_template, b.chat_template);
    assert_eq!((a.special.bos, a.special.eos, a.special.add_bos), (b.special.bos, b.special.eos, b.special.add_bos));
    assert!(b.special.is_stop(2), "generation_config's eos id 2 (<|im_end|>) ends generation");

    let run = |m: &LoadedModel| m.model.forward_last(&ids, &mut m.model.new_cache()).unwrap();
    let (la, lb) = (run(&from_gguf), run(&from_hf));
    let scale = la.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = la.iter().zip(&lb).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    // Same weights; the two paths differ in RoPE pairing order and kernels: f32 rounding only.
    assert!(diff <= 1e-5 * scale, "max |Δlogit| {diff} of {scale}");
}
