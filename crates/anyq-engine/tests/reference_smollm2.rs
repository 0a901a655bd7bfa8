//! anyq on the real SmolLM2-135M-Instruct (Q4_1 GGUF) against fixtures computed by an independent
//! implementation: PyTorch + transformers, which dequantizes the same GGUF with the `gguf`
//! package (`scripts/make-fixtures`). Both compute in f32, so the bounds are rounding-level.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyq_engine::{generate, perplexity, Sampler, SamplingParams};
use anyq_models::{load_model, LoadedModel};
use serde_json::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn assets() -> PathBuf {
    std::env::var_os("ANYQ_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"))
}

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let text = std::fs::read_to_string(repo_root().join("tests/fixtures/smollm2_reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = assets().join(fixture()["model"].as_str().unwrap());
        assert!(path.exists(), "{} is missing: run scripts/install-assets first", path.display());
        load_model(&path, &|_, _| {}).unwrap()
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
}

fn reference_logits(file: &str) -> Vec<f32> {
    let bytes = std::fs::read(repo_root().join("tests/fixtures").join(file)).unwrap();
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn last_position_logits_match_transformers() {
    let loaded = model();
    for prompt in fixture()["prompts"].as_array().unwrap() {
        let tokens = ids(&prompt["ids"]);
        let logits = loaded.model.forward_last(&tokens, &mut loaded.model.new_cache()).unwrap();
        let reference = reference_logits(prompt["logits_file"].as_str().unwrap());
        assert_eq!(logits.len(), reference.len());
        let max_ref = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max_diff = logits.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let relative = max_diff / max_ref;
        eprintln!("{:?}: max |Δlogit| = {max_diff:.2e}, relative {relative:.2e}", prompt["text"]);
        assert!(relative <= 1e-3, "{:?}: max |Δlogit| / max |logit| = {relative:.2e}", prompt["text"]);
    }
}

#[test]
fn greedy_tokens_match_transformers_for_32_steps() {
    let loaded = model();
    for prompt in fixture()["prompts"].as_array().unwrap() {
        let expected = ids(&prompt["greedy"]);
        let mut sampler = Sampler::new(SamplingParams::default());
        // No stop ids: the reference ran plain argmax for 32 steps, through EOS if it came.
        let out =
            generate(&loaded.model, &ids(&prompt["ids"]), expected.len(), &mut sampler, &[], &mut |_| true).unwrap();
        assert_eq!(out.tokens, expected, "{:?}", prompt["text"]);
    }
}

#[test]
fn perplexity_matches_transformers_to_three_significant_digits() {
    let p = &fixture()["perplexity"];
    let tokens = ids(&p["ids"]);
    let ctx = p["ctx"].as_u64().unwrap() as usize;
    let report = perplexity(&model().model, &tokens, ctx, None, &|_, _| {}).unwrap();
    let expected = p["ppl"].as_f64().unwrap();
    eprintln!("ppl {} vs reference {expected}", report.ppl);
    assert_eq!(report.nll_per_window.len(), p["windows"].as_u64().unwrap() as usize);
    assert!((report.ppl - expected).abs() / expected < 5e-4, "ppl {} vs {expected}", report.ppl);
    for (ours, theirs) in report.nll_per_window.iter().zip(p["nll_per_window"].as_array().unwrap()) {
        assert!((ours - theirs.as_f64().unwrap()).abs() < 1e-3, "window NLL {ours} vs {theirs}");
    }
}

#[test]
fn tokenizer_matches_reference_on_the_evaluation_text() {
    let p = &fixture()["perplexity"];
    let text = std::fs::read_to_string(assets().join("text").join(p["text_file"].as_str().unwrap())).unwrap();
    let bundle = model().tokenizer.as_ref().expect("the GGUF carries a tokenizer");
    let encoded = bundle.tokenizer.encode(text, false).unwrap();
    assert_eq!(encoded.len(), p["n_tokens_total"].as_u64().unwrap() as usize);
    let expected = ids(&p["ids"]);
    assert_eq!(&encoded.get_ids()[..expected.len()], &expected[..]);
    for prompt in fixture()["prompts"].as_array().unwrap() {
        let encoded = bundle.tokenizer.encode(prompt["text"].as_str().unwrap(), false).unwrap();
        assert_eq!(encoded.get_ids(), &ids(&prompt["ids"])[..]);
    }
}

/// llama.cpp (`scripts/llamacpp-fixtures`) is a second, looser reference: it multiplies the Q4_1
/// weights by activations quantized to 8 bits, which moves logits by about 1% of their range.
#[test]
fn top_logits_agree_with_llama_cpp_within_its_activation_quantization() {
    let text = std::fs::read_to_string(repo_root().join("tests/fixtures/llamacpp_reference.json")).unwrap();
    let llama_cpp: Value = serde_json::from_str(&text).unwrap();
    let loaded = model();
    for prompt in llama_cpp["prompts"].as_array().unwrap() {
        let logits = loaded.model.forward_last(&ids(&prompt["ids"]), &mut loaded.model.new_cache()).unwrap();
        let scale = prompt["max_abs_logit"].as_f64().unwrap();
        let top = prompt["top"].as_array().unwrap();
        let max_diff = top
            .iter()
            .map(|pair| (logits[pair[0].as_u64().unwrap() as usize] as f64 - pair[1].as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{:?}: max |Δlogit| / max |logit| vs llama.cpp on its top 32 = {:.2e}",
            prompt["text"],
            max_diff / scale
        );
        assert!(max_diff / scale <= 3e-2, "{:?}: {:.2e}", prompt["text"], max_diff / scale);
        assert_eq!(anyq_engine::argmax(&logits) as u64, top[0][0].as_u64().unwrap(), "{:?}: top token", prompt["text"]);
    }
}

#[test]
fn streamed_text_equals_the_whole_decode_even_when_tokens_split_characters() {
    let tokenizer = &model().tokenizer.as_ref().unwrap().tokenizer;
    // Byte-level BPE splits the CJK characters and emoji into several tokens each.
    let text = " café naïve — “quoted” 日本語 🦀 end.\n  two  spaces";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert!(ids.len() > text.chars().count() / 2);
    let mut stream = anyq_engine::TextStream::new(tokenizer);
    let mut pieces = Vec::new();
    for &id in &ids {
        let piece = stream.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "a piece held a broken character: {piece:?}");
        pieces.push(piece);
    }
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().any(String::is_empty), "some tokens hold partial characters and print nothing");
}
