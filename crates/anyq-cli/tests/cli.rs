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
        (&["generate", model, "-p", "hi", "--quantize", "magic-w3"], "unknown quantization method \"magic-w3\""),
        (&["generate", model, "-p", "hi", "--quantize", "smoothquant-w8a8"], "needs calibration text: --calib FILE"),
        (&["generate", model, "-p", "hi", "--quantize", "rtn-w4a16-g0"], "group size must be positive"),
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

/// Reads the table of report.md: method → its cells after the method's.
fn report_rows(report: &str) -> std::collections::HashMap<String, Vec<String>> {
    report
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| method") && !l.starts_with("| ---"))
        .map(|l| {
            let cells: Vec<String> = l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect();
            (cells[0].clone(), cells[1..].to_vec())
        })
        .collect()
}

#[test]
fn report_compares_methods_in_a_table_and_a_chart() {
    let model = model();
    let novel = std::fs::read_to_string(assets().join("text/persuasion.txt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (eval, out) = (dir.path().join("eval.txt"), dir.path().join("report"));
    std::fs::write(&eval, &novel[..8000]).unwrap();
    let args = [
        "report",
        model.to_str().unwrap(),
        "--methods",
        "rtn-w8a16,rtn-w4a16-g32",
        "--text",
        eval.to_str().unwrap(),
        "--ctx",
        "64",
        "--max-windows",
        "2",
        "--decode-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = anyq(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(text(&run.stdout).contains(&report), "stdout: {}", text(&run.stdout));
    assert!(report.contains("2 windows x 64 tokens") && report.contains("threads: 2"), "{report}");
    let rows = report_rows(&report);
    // Cells: W bits, A bits, MiB, ppl, Δppl %, prefill tok/s, decode tok/s.
    let cell = |method: &str, i: usize| -> f64 { rows[method][i].parse().unwrap_or_else(|e| panic!("{e}: {report}")) };
    assert_eq!(rows["fp"][..2], ["as loaded", "as loaded"], "{report}");
    assert_eq!(rows["rtn-w4a16-g32"][..2], ["4", "16"], "{report}");
    for method in ["fp", "rtn-w8a16", "rtn-w4a16-g32"] {
        let ppl = cell(method, 3);
        assert!(ppl.is_finite() && (2.0..1000.0).contains(&ppl), "{method}: {report}");
        assert!(cell(method, 2) > 10.0 && cell(method, 5) > 0.0 && cell(method, 6) > 0.0, "{method}: {report}");
    }
    assert!(cell("rtn-w4a16-g32", 2) < cell("rtn-w8a16", 2), "{report}");
    // 8 bits barely move perplexity; 4 bits move it more (+14% on these 126 tokens).
    assert!(cell("rtn-w8a16", 4).abs() < 5.0 && cell("rtn-w4a16-g32", 4) > 5.0, "{report}");

    let svg = std::fs::read_to_string(out.join("ppl_vs_bits.svg")).unwrap();
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>") && svg.contains("rtn-w8a16") && svg.contains("rtn-w4a16-g32"));
    // The checkpoints were measured in scratch folders that are gone; a second run overwrites.
    let mut files: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    files.sort();
    assert_eq!(files, ["ppl_vs_bits.svg", "report.md"]);
}

#[test]
fn report_rejects_bad_input_before_any_work() {
    let model = model();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let out = out.to_str().unwrap();
    let file = repo_root().join("Cargo.toml");
    let file = file.to_str().unwrap();
    let cases = [
        ("rtn-w8a16,nope-w3", out, "unknown quantization method \"nope-w3\""),
        ("rtn-w8a16,smoothquant-w8a8", out, "smoothquant-w8a8 needs calibration text: --calib FILE"),
        ("rtn-w8a16", file, "is not a folder"),
    ];
    for (methods, out, expected) in cases {
        let args = ["report", model, "--methods", methods, "--text", file, "--out", out];
        let run = anyq(&args);
        let stderr = text(&run.stderr);
        assert!(!run.status.success() && stderr.contains(expected), "{args:?}: {stderr}");
        // Rejected before loading the model: no progress line for the first row, no folder.
        assert!(!stderr.contains("[1/") && !dir.path().join("report").exists(), "{args:?}: {stderr}");
    }
}

#[test]
fn the_gpu_refuses_methods_it_cannot_run_before_any_work() {
    let model = model();
    let cases = [
        ("rtn-w8a8", "--quantize rtn-w8a8: only FP16 and MixQ models run on the GPU so far; use --device cpu"),
        ("mixq-w4a8-g64", "groups of 64: the GPU needs groups of a multiple of 128"),
    ];
    for (method, expected) in cases {
        let args = ["generate", model.to_str().unwrap(), "-p", "Hi", "--device", "cuda", "--quantize", method];
        let out = anyq(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("GPU:"), "{args:?}: {stderr}");
    }
}

#[test]
fn quantize_writes_a_checkpoint_that_generate_and_eval_load() {
    let model = model();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("smollm2-mixq");
    let calib = assets().join("text/emma.txt");
    let out = anyq(&[
        "quantize",
        model,
        "--method",
        "mixq-w8a8",
        "--calib",
        calib.to_str().unwrap(),
        "--calib-windows",
        "2",
        "--calib-ctx",
        "64",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("mixq-w8a8 checkpoint") && text(&out.stdout).contains("MiB"));
    let config = std::fs::read_to_string(out_dir.join("config.json")).unwrap();
    assert!(config.contains("\"quant_method\": \"anyq\"") && config.contains("\"outlier_channels\""), "{config}");

    let checkpoint = out_dir.to_str().unwrap();
    let out = anyq(&["generate", checkpoint, "--chat", "-p", "What is the capital of France?", "-n", "24"]);
    assert!(out.status.success() && text(&out.stdout).contains("Paris"), "{}", text(&out.stderr));
    let persuasion = assets().join("text/persuasion.txt");
    let out =
        anyq(&["eval", "ppl", checkpoint, "--text", persuasion.to_str().unwrap(), "--ctx", "64", "--max-windows", "2"]);
    assert!(out.status.success() && text(&out.stdout).contains("ppl: "), "{}", text(&out.stderr));
    if anyq_cuda::CudaDevice::available() {
        // The checkpoint's MixQ layers on the GPU's MixQ kernels.
        let out = anyq(&[
            "generate",
            checkpoint,
            "--chat",
            "-p",
            "What is the capital of France?",
            "-n",
            "24",
            "--device",
            "cuda",
        ]);
        assert!(out.status.success() && text(&out.stdout).contains("Paris"), "{}", text(&out.stderr));
        let text_path = persuasion.to_str().unwrap();
        let args =
            ["eval", "ppl", checkpoint, "--text", text_path, "--ctx", "64", "--max-windows", "2", "--device", "cuda"];
        let out = anyq(&args);
        let stdout = text(&out.stdout);
        assert!(out.status.success() && stdout.contains("ppl: ") && stdout.contains("MixQ on the GPU"), "{stdout}");
    }

    // Quantizing again, or into a folder that is not empty, fails before any work.
    let again = dir.path().join("again");
    let out = anyq(&["quantize", checkpoint, "--method", "rtn-w8a8", "--out", again.to_str().unwrap()]);
    assert!(!out.status.success() && text(&out.stderr).contains("already quantized"), "{}", text(&out.stderr));
    let out = anyq(&["quantize", model, "--method", "rtn-w8a8", "--out", checkpoint]);
    assert!(!out.status.success() && text(&out.stderr).contains("not empty"), "{}", text(&out.stderr));
}

#[test]
fn bench_e2e_rejects_bad_arguments_before_looking_for_a_gpu() {
    let cases: &[(&[&str], &str)] = &[
        (&["--batch", "1,0"], "batch sizes must be at least 1"),
        (&["--ctx", "0"], "the context must be 1 to 8191 positions"),
        (&["--ctx", "8192"], "the context must be 1 to 8191 positions"),
        (&["--variants", "fp16,int3"], "unknown variant \"int3\": expected fp16, w8a8, w4a8"),
        (&["--outliers", "60"], "outliers are a percentage in 0..=50"),
        (&["--layers", "0"], "at least one layer"),
        (&["--warmup", "0"], "at least one warm-up step"),
    ];
    for (extra, expected) in cases {
        let args: Vec<&str> = ["bench", "e2e"].iter().chain(extra.iter()).copied().collect();
        let out = anyq(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
    if !anyq_cuda::CudaDevice::available() {
        let out = anyq(&["bench", "e2e", "--layers", "1", "--batch", "1"]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success() && stderr.contains("GPU") && !stderr.contains("panicked"), "{stderr}");
    }
}
