//! Calibration on the real model and real text: statistics for every linear input of every layer.

use std::path::PathBuf;

use anyq_engine::calibrate;
use anyq_models::{load_model, LinearInput};

#[test]
fn calibration_covers_every_linear_input_and_sees_outlier_channels() {
    let assets = std::env::var_os("ANYQ_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let path = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/install-assets first", path.display());
    let loaded = load_model(&path, &|_, _| {}).unwrap();
    let tokenizer = &loaded.tokenizer.as_ref().unwrap().tokenizer;
    let text = std::fs::read_to_string(assets.join("text/emma.txt")).unwrap();
    let ids = tokenizer.encode(&text[..20_000], false).unwrap().get_ids().to_vec();

    let calls = std::cell::Cell::new(0);
    let stats = calibrate(&loaded.model, &ids, 64, 3, &|done, total| {
        assert_eq!(total, 3);
        calls.set(done);
    })
    .unwrap();
    assert_eq!((stats.tokens, calls.get()), (192, 3));
    let c = &loaded.model.config;
    assert_eq!(stats.inputs.len(), c.num_layers * LinearInput::ALL.len());
    for ((layer, input), s) in &stats.inputs {
        assert_eq!(s.tokens(), 192, "layer {layer} {input:?}");
        let expected = match input {
            LinearInput::Attention | LinearInput::Mlp => c.hidden_size,
            LinearInput::AttentionOutput => c.num_heads * c.head_dim,
            LinearInput::MlpDown => c.intermediate_size,
        };
        assert_eq!(s.channels(), expected);
        assert!(s.abs_max().iter().all(|v| v.is_finite()));
    }
    // MixQ's premise on this model: a few channels of the normed inputs dwarf the typical one.
    let attn_in = stats.get(c.num_layers / 2, LinearInput::Attention).unwrap();
    let mut sorted = attn_in.abs_max().to_vec();
    sorted.sort_by(f32::total_cmp);
    let (median, max) = (sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
    eprintln!("layer {} attention input: max |x| {max:.2}, median channel max {median:.2}", c.num_layers / 2);
    assert!(max > 4.0 * median, "expected outlier channels: max {max}, median {median}");
}
