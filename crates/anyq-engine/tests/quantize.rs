//! In-memory quantization of the real model: 8-bit weight-only RTN must cost almost nothing,
//! and fewer bits must cost more, on the reference perplexity windows.

use std::path::PathBuf;

use anyq_engine::{perplexity, quantize_model};
use anyq_models::load_model;
use anyq_quant::methods::method_by_name;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn rtn_perplexity_grows_as_bits_shrink() {
    let assets = std::env::var_os("ANYQ_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"));
    let path = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/install-assets first", path.display());
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/smollm2_reference.json")).unwrap(),
    )
    .unwrap();
    let p = &fixture["perplexity"];
    let ids: Vec<u32> = p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let ctx = p["ctx"].as_u64().unwrap() as usize;
    let fp = p["ppl"].as_f64().unwrap();

    let ppl_with = |method: &str| {
        let mut loaded = load_model(&path, &|_, _| {}).unwrap();
        let before = loaded.model.weight_bytes();
        quantize_model(&mut loaded.model, method_by_name(method).unwrap().as_ref(), None, &|_, _| {}).unwrap();
        eprintln!("{method}: {before} -> {} bytes", loaded.model.weight_bytes());
        perplexity(&loaded.model, &ids, ctx, None, &|_, _| {}).unwrap().ppl
    };
    let w8 = ppl_with("rtn-w8a16");
    let w4 = ppl_with("rtn-w4a16-g32");
    eprintln!("fp {fp:.3}, rtn-w8a16 {w8:.3}, rtn-w4a16-g32 {w4:.3}");
    assert!((w8 - fp).abs() / fp < 0.01, "8-bit weights: ppl {w8} vs {fp}");
    assert!(w4 > w8 && w4 < 2.0 * fp, "4-bit weights cost something, not everything: {w4}");
}
