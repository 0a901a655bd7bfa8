//! `anyq`: quantized LLM inference from the command line.

mod bench;
mod bench_e2e;
mod bench_gpu;
mod bench_kernels;
mod commands;
mod progress;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "anyq", version, about = "Quantize large language models and run them fast")]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Quantize a model (calibrating where the method needs it) and write a checkpoint folder
    /// that `generate` and `eval` load directly.
    Quantize(QuantizeCommandArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Measure speed.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Compare methods on one model: checkpoint size, perplexity and speed, as a markdown table
    /// and a chart of perplexity against weight bits.
    Report(report::ReportArgs),
    /// Print a model's configuration and size.
    Info {
        /// A .gguf file, or a Hugging Face model folder.
        model: PathBuf,
    },
}

#[derive(Args)]
struct GenerateArgs {
    /// A .gguf file, or a Hugging Face model folder.
    model: PathBuf,
    #[arg(long, short)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the model runs: `cuda` runs it on the first NVIDIA GPU (float layers in FP16, MixQ
    /// layers on MixQ's kernels).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
    #[command(flatten)]
    quantize: QuantizeArgs,
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    Cpu,
    /// The first NVIDIA GPU: FP16 and MixQ models.
    Cuda,
}

/// In-memory quantization before running.
#[derive(Args)]
pub struct QuantizeArgs {
    /// Quantize the model first, e.g. `rtn-w4a16-g32`, `rtn-w8a8`, `smoothquant-w8a8`.
    #[arg(long)]
    pub quantize: Option<String>,
    #[command(flatten)]
    pub calib: CalibArgs,
}

/// Calibration text for methods that need activation statistics.
#[derive(Args)]
pub struct CalibArgs {
    /// A UTF-8 text file (not the evaluation text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration windows of --calib-ctx tokens.
    #[arg(long, default_value_t = 128)]
    pub calib_windows: usize,
    #[arg(long, default_value_t = 512)]
    pub calib_ctx: usize,
}

#[derive(Args)]
struct QuantizeCommandArgs {
    /// A .gguf file, or a Hugging Face model folder.
    model: PathBuf,
    /// mixq-w8a8, mixq-w4a8-g128, smoothquant-w8a8, rtn-w4a16-g128, ... (see README).
    #[arg(long)]
    method: String,
    #[command(flatten)]
    calib: CalibArgs,
    /// The new checkpoint folder (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity on a text file (WikiText-2 protocol: non-overlapping windows of --ctx tokens).
    Ppl(PplArgs),
}

#[derive(Args)]
struct PplArgs {
    model: PathBuf,
    /// A UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
    /// Evaluate only the first N windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Where the model runs: `cuda` runs it on the first NVIDIA GPU (float layers in FP16, MixQ
    /// layers on MixQ's kernels).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
    #[command(flatten)]
    quantize: QuantizeArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens/s on the CPU (llama-bench's pp/tg tests).
    Cpu(bench::CpuBenchArgs),
    /// Integer (W8A8, W4A8) linear kernels against the f32 product, shape by shape.
    Kernels(bench_kernels::KernelBenchArgs),
    /// MixQ W8A8/W4A8 GEMMs on an NVIDIA GPU against cuBLAS BF16 and cuBLASLt INT8.
    Gemm(bench_gpu::GemmBenchArgs),
    /// Decode tokens/s of a LLaMA-3-8B-shaped model with random weights on an NVIDIA GPU: FP16
    /// (cuBLAS) against MixQ W8A8 and W4A8, batch by batch.
    E2e(bench_e2e::E2eBenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The command runs on a worker of the pool rather than beside it: each of the hundreds of
    // parallel kernels per token then starts without waking a sleeping thread, which halves
    // decode's scheduling overhead on few cores.
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(cli.threads.unwrap_or(0)).build() {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: cannot start worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = pool.install(|| match cli.command {
        Command::Generate(args) => commands::generate(args),
        Command::Quantize(args) => commands::quantize(args),
        Command::Eval(EvalCommand::Ppl(args)) => commands::perplexity(args),
        Command::Bench(BenchCommand::Cpu(args)) => bench::cpu(args),
        Command::Bench(BenchCommand::Kernels(args)) => bench_kernels::run(args),
        Command::Bench(BenchCommand::Gemm(args)) => bench_gpu::gemm(args),
        Command::Bench(BenchCommand::E2e(args)) => bench_e2e::run(args),
        Command::Report(args) => report::run(args),
        Command::Info { model } => commands::info(&model),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
