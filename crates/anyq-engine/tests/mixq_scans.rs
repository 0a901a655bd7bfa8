//! MixQ on the real model: the scans that RMSNorm and the SwiGLU product compute while they
//! write the activations give the logits, bit for bit, and the outlier sets of every layer
//! scanning its own input.

use std::path::PathBuf;

use anyq_core::{DenseLinear, Linear};
use anyq_engine::{calibrate, outlier_report, quantize_model};
use anyq_models::{load_model, LINEAR_MODULES};
use anyq_quant::methods::method_by_name;

/// A layer that asks its producer for nothing, so that it scans its input in `forward`.
struct Unscanned(Box<dyn Linear>);

impl Linear for Unscanned {
    fn in_features(&self) -> usize {
        self.0.in_features()
    }
    fn out_features(&self) -> usize {
        self.0.out_features()
    }
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.0.forward(x, m, out);
    }
    fn weight_bytes(&self) -> usize {
        self.0.weight_bytes()
    }
    fn weight_row(&self, row: usize, out: &mut [f32]) {
        self.0.weight_row(row, out);
    }
    fn bias(&self) -> Option<&[f32]> {
        self.0.bias()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self.0.as_any()
    }
}

#[test]
fn fused_scans_give_the_logits_and_outlier_sets_of_per_layer_scans() {
    let assets = std::env::var_os("ANYQ_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let path = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/install-assets first", path.display());
    let load = || load_model(&path, &|_, _| {}).unwrap();
    let (mut fused, mut unfused) = (load(), load());
    let tokenizer = &fused.tokenizer.as_ref().unwrap().tokenizer;
    let encode = |file: &str| {
        let text = std::fs::read_to_string(assets.join("text").join(file)).unwrap();
        tokenizer.encode(&text[..20_000], false).unwrap().get_ids().to_vec()
    };
    // Little calibration, on another book than the one run: run-time outliers join the sets.
    let stats = calibrate(&fused.model, &encode("emma.txt"), 64, 2, &|_, _| {}).unwrap();
    let method = method_by_name("mixq-w8a8").unwrap();
    for model in [&mut fused.model, &mut unfused.model] {
        quantize_model(model, method.as_ref(), Some(&stats), &|_, _| {}).unwrap();
    }
    let model = &mut unfused.model;
    for layer in 0..model.config.num_layers {
        for module in LINEAR_MODULES {
            let mixq = model.linear(layer, module).unwrap();
            let (n, k) = (mixq.out_features(), mixq.in_features());
            let placeholder = Box::new(DenseLinear::new(vec![0.0; n * k], None, n, k));
            let mixq = model.replace_linear(layer, module, placeholder).unwrap();
            model.replace_linear(layer, module, Box::new(Unscanned(mixq))).unwrap();
        }
    }

    let ids = encode("persuasion.txt");
    let (prompt, next) = ids[1000..1100].split_at(92);
    let (mut fused_cache, mut unfused_cache) = (fused.model.new_cache(), unfused.model.new_cache());
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let logits = fused.model.forward_last(prompt, &mut fused_cache).unwrap();
    assert_eq!(bits(logits), bits(unfused.model.forward_last(prompt, &mut unfused_cache).unwrap()), "prefill");
    for (i, &token) in next.iter().enumerate() {
        let logits = fused.model.forward_last(&[token], &mut fused_cache).unwrap();
        let expected = unfused.model.forward_last(&[token], &mut unfused_cache).unwrap();
        assert_eq!(bits(logits), bits(expected), "decode step {i}");
    }
    let report = outlier_report(&fused.model);
    assert_eq!(report, outlier_report(&unfused.model));
    let grown: u64 = report.iter().map(|(_, _, s)| s.calls_with_new_outliers).sum();
    eprintln!("{grown} layer calls added outlier channels");
    assert!(grown > 0, "the run must meet new outliers");
}
