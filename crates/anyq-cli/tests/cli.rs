//! The `anyq` binary on the real model: what a user types, what they see, and how bad input fails.

use std::path::PathBuf;
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn assets() -> PathBuf {
    std::env::var_os("ANYQ_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"))
}

fn model() -> PathBuf {
    let path = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/install-assets first", path.display());
    path
}

fn anyq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anyq")).args(["--threads", "2"]).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn chat_answers_and_reports_speed() {
    let model = model();
    let out = anyq(&[
        "generate",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "-n",
        "24",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Paris"), "stdout: {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("prefill:") && stderr.contains("tokens/s") && stderr.contains("stop: Stop"), "{stderr}");
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let model = model();
    let run = |seed: &str| {
        let out = anyq(&[
            "generate",
            model.to_str().unwrap(),
            "--prompt",
            "The weather today",
            "-n",
            "24",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--repetition-penalty",
            "1.1",
            "--seed",
            seed,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let first = run("5");
    assert!(first.starts_with("The weather today") && first.len() > "The weather today".len() + 20, "{first}");
    assert_eq!(first, run("5"));
    assert_ne!(first, run("6"));
}

#[test]
fn perplexity_of_a_short_text() {
    let model = model();
    let novel = std::fs::read_to_string(assets().join("text/persuasion.txt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("excerpt.txt");
    std::fs::write(&file, &novel[..8000]).unwrap();
    let out = anyq(&[
        "eval",
        "ppl",
        model.to_str().unwrap(),
        "--text",
        file.to_str().unwrap(),
        "--ctx",
        "128",
        "--max-windows",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("windows: 3 x 128 tokens, 381 tokens predicted"), "{stdout}");
    let ppl: f64 = stdout.lines().find_map(|l| l.strip_prefix("ppl: ")).unwrap().trim().parse().unwrap();
    // A 135M model on Austen at a short context: far better than chance (49152), far from perfect.
    assert!((5.0..200.0).contains(&ppl), "ppl {ppl}");
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let model = model();
    let model = model.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "missing.gguf", "-p", "hi"], "missing.gguf: No such file"),
        (&["generate", model, "-p", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (&["generate", model, "-p", "hi", "--temperature=-1"], "temperature must be"),
        (&["eval", "ppl", model, "--text", "missing.txt"], "cannot read missing.txt"),
        (&["eval", "ppl", model, "--text", "Cargo.toml", "--ctx", "100000"], "exceeds the model's context"),
    ];
    for (args, expected) in cases {
        let out = anyq(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Too short.").unwrap();
    let out = anyq(&["eval", "ppl", model, "--text", short.to_str().unwrap(), "--ctx", "64"]);
    assert!(text(&out.stderr).contains("not enough for one window"), "{}", text(&out.stderr));
}

#[test]
fn quantize_on_load_names_the_method_and_rejects_bad_ones() {
    let model = model();
    let model = model.to_str().unwrap();
    let out = anyq(&["generate", model, "-p", "The capital of France is", "-n", "4", "--quantize", "rtn-w8a8"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("quantized with rtn-w8a8"), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Paris"), "{}", text(&out.stdout));
    let cases: &[(&[&str], &str)] = &[
        (&["generate", model, "-p", "hi", "--quantize", "gptq-w3"], "unknown quantization method \"gptq-w3\""),
        (&["generate", model, "-p", "hi", "--quantize", "smoothquant-w8a8"], "needs calibration text: --calib FILE"),
        (&["generate", model, "-p", "hi", "--quantize", "rtn-w4a16-g128"], "group size 128"),
    ];
    for (args, expected) in cases {
        let out = anyq(args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn mixq_evaluation_reports_its_outlier_channels() {
    let model = model();
    let novel = std::fs::read_to_string(assets().join("text/persuasion.txt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (calib, eval) = (dir.path().join("calib.txt"), dir.path().join("eval.txt"));
    std::fs::write(&calib, &novel[..6000]).unwrap();
    std::fs::write(&eval, &novel[6000..12000]).unwrap();
    let out = anyq(&[
        "eval",
        "ppl",
        model.to_str().unwrap(),
        "--text",
        eval.to_str().unwrap(),
        "--ctx",
        "128",
        "--max-windows",
        "2",
        "--quantize",
        "mixq-w8a8",
        "--calib",
        calib.to_str().unwrap(),
        "--calib-windows",
        "4",
        "--calib-ctx",
        "128",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("MixQ outlier channels (30 layers)"), "{stdout}");
    // Two windows through 30 layers: 60 forward calls per module.
    let down = stdout.lines().find(|l| l.starts_with("| mlp.down_proj |")).expect("a row per module");
    assert_eq!(down.split('|').nth(4).unwrap().trim(), "60", "{down}");
}
