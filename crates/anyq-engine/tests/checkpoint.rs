//! Quantized checkpoints of the real model: a checkpoint loads back to exactly the model that
//! was saved, and a corrupt or mismatched one is an error that says what is wrong.

use std::path::{Path, PathBuf};

use anyq_engine::{calibrate_with, quantize_model};
use anyq_models::{load_model, save_quantized, LoadedModel, LINEAR_MODULES};
use anyq_quant::methods::method_by_name;
use safetensors::SafeTensors;

fn assets() -> PathBuf {
    std::env::var_os("ANYQ_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
}

fn model_path() -> PathBuf {
    let path = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/install-assets first", path.display());
    path
}

/// The real model quantized in memory with `method` (calibrated on 4 × 64 tokens of Emma).
fn quantized(method: &str) -> LoadedModel {
    let method = method_by_name(method).unwrap();
    let mut loaded = load_model(&model_path(), &|_, _| {}).unwrap();
    let stats = method.needs_calibration().then(|| {
        let text = std::fs::read_to_string(assets().join("text/emma.txt")).unwrap();
        let tokenizer = &loaded.tokenizer.as_ref().unwrap().tokenizer;
        let ids = tokenizer.encode(&text[..20_000], false).unwrap().get_ids().to_vec();
        calibrate_with(&loaded.model, &ids, 64, 4, method.needs_hessian(), &|_, _| {}).unwrap()
    });
    loaded.model.use_neox_rope();
    quantize_model(&mut loaded.model, method.as_ref(), stats.as_ref(), &|_, _| {}).unwrap();
    loaded
}

fn save(loaded: &LoadedModel, method: &str, dir: &Path) -> u64 {
    let method = method_by_name(method).unwrap();
    save_quantized(&loaded.model, method.as_ref(), loaded.tokenizer.as_ref(), dir, &|_, _| {}).unwrap()
}

fn load_error(dir: &Path) -> String {
    match load_model(dir, &|_, _| {}) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn checkpoints_load_back_to_the_saved_layers() {
    let prompt = [1u32, 504, 3458, 282, 4649, 314, 1345, 30];
    let methods = [
        "rtn-w4a16-g32",
        "rtn-w2a16-g64-bb",
        "gptq-w4a16-g128",
        "rtn-w8a8",
        "smoothquant-w8a8",
        "mixq-w8a8",
        "mixq-w4a8-g128",
    ];
    for method in methods {
        let original = quantized(method);
        let dir = tempfile::tempdir().unwrap();
        let size = save(&original, method, dir.path());
        let loaded = load_model(dir.path(), &|_, _| {}).unwrap();
        assert_eq!(loaded.quantization.as_ref().unwrap().method, method);
        assert!(size > loaded.model.weight_bytes() as u64 / 2, "{method}: {size} bytes on disk");
        for layer in 0..original.model.config.num_layers {
            for module in LINEAR_MODULES {
                let (a, b) =
                    (original.model.linear(layer, module).unwrap(), loaded.model.linear(layer, module).unwrap());
                assert!(a.dense_weight() == b.dense_weight(), "{method}: layer {layer} {module} changed");
                assert_eq!(a.bias(), b.bias());
            }
        }
        // The GGUF's Q8_0 embeddings are stored as they are: the same model, bit for bit.
        assert_eq!(loaded.model.weight_bytes(), original.model.weight_bytes(), "{method}");
        let logits = |m: &LoadedModel| m.model.forward_last(&prompt, &mut m.model.new_cache()).unwrap();
        assert!(logits(&original) == logits(&loaded), "{method}: logits differ");
        eprintln!("{method}: {size} bytes on disk");
    }
}

/// The tensors of a safetensors file, to be edited and written back.
fn read_tensors(path: &Path) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect()
}

fn write_tensors(path: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()));
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of the checkpoint `from` with `edit` applied to its config and tensors.
fn corrupted(
    from: &Path,
    edit_config: impl Fn(&mut serde_json::Value),
    edit_tensors: impl Fn(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let weights = dir.path().join("model.safetensors");
    let mut tensors = read_tensors(&weights);
    edit_tensors(&mut tensors);
    write_tensors(&weights, &tensors);
    dir
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_clear_errors() {
    let good = tempfile::tempdir().unwrap();
    save(&quantized("mixq-w8a8"), "mixq-w8a8", good.path());
    let q = "quantization_config";
    let cases: Vec<(&str, tempfile::TempDir, &[&str])> = vec![
        ("wrong bits", corrupted(good.path(), |c| c[q]["bits"] = 4.into(), |_| {}), &["bits is 4", "mixq-w8a8"]),
        (
            "other method",
            corrupted(good.path(), |c| c[q]["method"] = "rtn-w4a16-g32".into(), |_| {}),
            &["bits is 8", "rtn-w4a16-g32"],
        ),
        (
            "unknown method",
            corrupted(good.path(), |c| c[q]["method"] = "magic-w3a3".into(), |_| {}),
            &["unknown quantization method"],
        ),
        ("foreign format", corrupted(good.path(), |c| c[q]["quant_method"] = "gptq".into(), |_| {}), &["gptq"]),
        (
            "missing scales",
            corrupted(good.path(), |_| {}, |t| t.retain(|(n, ..)| n != "model.layers.3.mlp.down_proj.scales")),
            &["model.layers.3.mlp.down_proj", "\"scales\" is missing"],
        ),
        (
            "misshapen weight",
            corrupted(
                good.path(),
                |_| {},
                |t| {
                    let w = t.iter_mut().find(|(n, ..)| n == "model.layers.0.self_attn.k_proj.qweight").unwrap();
                    w.2.reverse();
                },
            ),
            &["model.layers.0.self_attn.k_proj", "qweight"],
        ),
        (
            "outlier out of range",
            corrupted(
                good.path(),
                |_| {},
                |t| {
                    let name = "model.layers.15.self_attn.q_proj.outlier_channels";
                    let o = t.iter_mut().find(|(n, ..)| n == name).expect("layer 15 has attention outliers");
                    o.3[..4].copy_from_slice(&100_000i32.to_le_bytes());
                },
            ),
            &["model.layers.15.self_attn.q_proj", "100000"],
        ),
    ];
    for (case, dir, expected) in cases {
        let message = load_error(dir.path());
        for e in expected {
            assert!(message.contains(e), "{case}: {message:?} does not say {e:?}");
        }
    }

    let truncated = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(good.path()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, truncated.path().join(path.file_name().unwrap())).unwrap();
    }
    let weights = truncated.path().join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(len / 2).unwrap();
    assert!(load_error(truncated.path()).contains("model.safetensors"));

    let err = save_quantized(
        &quantized("rtn-w8a16").model,
        method_by_name("rtn-w8a16").unwrap().as_ref(),
        None,
        good.path(),
        &|_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
}
