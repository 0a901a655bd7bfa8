//! `anyq bench kernels`: the integer W8A8 and W4A8 linear kernels against the f32 product they
//! replace, measured in the same run on the same shapes, so the ratio is the speed-up a
//! quantized model's linear layers get on this machine.

use std::time::Instant;

use anyq_core::cpu::int8::{gemm_w4a8_with, gemm_w8a8_with, quantize_rows_i8, I4Weight, I8Weight, IntKernel};
use anyq_core::cpu::matmul_xwt;
use anyq_core::testing::XorShift;
use clap::Args;

#[derive(Args)]
pub struct KernelBenchArgs {
    /// Rows of x (tokens per call): 1 is decode, more is prefill.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    m: Vec<usize>,
    /// Weight shapes as NxK (out × in); the default is SmolLM2-135M's plus one 7B-sized square.
    #[arg(long, value_delimiter = ',', default_value = "576x1536,1536x576,576x576,4096x4096")]
    shapes: Vec<String>,
    /// Timed repetitions of each product, interleaved (the fastest is reported: on a shared
    /// machine the others measure its neighbours); each lasts about 50 ms.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Group size of the W4A8 scales (64 divides every default k; SmolLM2's 576 in groups of
    /// 128 ends each row in a group of 64).
    #[arg(long, default_value_t = 64)]
    group: usize,
    /// W4A8 weights with zero points (asymmetric).
    #[arg(long)]
    zeros: bool,
    /// Integer kernel: avx512vnni, avx2 or portable (default: the best this CPU has).
    #[arg(long)]
    kernel: Option<String>,
}

pub fn run(args: KernelBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeats > 0, "--repeats must be > 0");
    anyhow::ensure!(args.group > 0 && args.group.is_multiple_of(8), "--group must be a multiple of 8");
    let kernel = match args.kernel.as_deref() {
        None => IntKernel::detect(),
        Some("avx512vnni") => IntKernel::Avx512Vnni,
        Some("avx2") => IntKernel::Avx2,
        Some("portable") => IntKernel::Portable,
        Some(other) => anyhow::bail!("unknown kernel {other:?}: expected avx512vnni, avx2 or portable"),
    };
    anyhow::ensure!(kernel.is_supported(), "this CPU cannot run the {kernel:?} kernel");
    let shapes = args.shapes.iter().map(|s| parse_shape(s)).collect::<anyhow::Result<Vec<_>>>()?;
    for &(n, k) in &shapes {
        anyhow::ensure!(k.is_multiple_of(8), "W4A8 needs k={k} to be a multiple of 8");
        anyhow::ensure!(n > 0, "shape {n}x{k} is empty");
    }

    println!("cpu: {}, threads: {}, integer kernel: {kernel:?}", cpu_model(), rayon::current_num_threads());
    let zeros = if args.zeros { " with zero points" } else { "" };
    println!("W8A8/W4A8 times include quantizing x per token; W4A8 groups of {}{zeros}.\n", args.group);
    println!("| shape (n×k) | m | f32 GFLOP/s | W8A8 GOP/s | W4A8 GOP/s | W8A8/f32 | W4A8/f32 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &(n, k) in &shapes {
        let mut rng = XorShift::new((n * 31 + k) as u64);
        let w = rng.floats(n * k);
        let random_i8 = |rng: &mut XorShift, len: usize, span: u64| {
            (0..len).map(|_| ((rng.next_u64() % (2 * span + 1)) as i64 - span as i64) as i8).collect::<Vec<_>>()
        };
        let w8 = I8Weight::new(&random_i8(&mut rng, n * k, 127), &vec![0.01; n], n, k);
        let groups = n * k.div_ceil(args.group);
        let w4_zeros = args.zeros.then(|| random_i8(&mut rng, groups, 7));
        let w4_values = random_i8(&mut rng, n * k, 7);
        let w4 = I4Weight::new(&w4_values, &vec![0.01; groups], w4_zeros.as_deref(), n, k, args.group);
        for &m in &args.m {
            let x = rng.floats(m * k);
            let mut out = vec![0.0f32; m * n];
            let (mut xq, mut xs) = (vec![0i8; m * k], vec![0.0f32; m]);
            let [f32_s, w8_s, w4_s] = best_seconds_per_call(args.repeats, |which| match which {
                0 => matmul_xwt(&x, &w, &mut out, m, n, k),
                1 => {
                    quantize_rows_i8(&x, m, k, &mut xq, &mut xs);
                    gemm_w8a8_with(kernel, &xq, &xs, &w8, None, &mut out, m, false);
                }
                _ => {
                    quantize_rows_i8(&x, m, k, &mut xq, &mut xs);
                    gemm_w4a8_with(kernel, &xq, &xs, &w4, None, &mut out, m, false);
                }
            });
            let ops = 2.0 * (m * n * k) as f64 * 1e-9;
            println!(
                "| {n}×{k} | {m} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
                ops / f32_s,
                ops / w8_s,
                ops / w4_s,
                f32_s / w8_s,
                f32_s / w4_s
            );
        }
    }
    Ok(())
}

pub(crate) fn parse_shape(s: &str) -> anyhow::Result<(usize, usize)> {
    let parse = || -> Option<(usize, usize)> {
        let (n, k) = s.split_once(['x', 'X', '×'])?;
        Some((n.trim().parse().ok()?, k.trim().parse().ok()?))
    };
    parse().ok_or_else(|| anyhow::anyhow!("shape {s:?} is not NxK"))
}

/// The best over `repeats` of the mean time per call of each of `N` products, `run(i)` running
/// product i. Each repeat times every product in turn, for about 50 ms each (sized by one
/// warm-up call), so a load that comes and goes on the machine meets them all alike.
fn best_seconds_per_call<const N: usize>(repeats: usize, mut run: impl FnMut(usize)) -> [f64; N] {
    let calls: [usize; N] = std::array::from_fn(|i| {
        let start = Instant::now();
        run(i);
        ((0.05 / start.elapsed().as_secs_f64().max(1e-9)) as usize).clamp(1, 100_000)
    });
    let mut best = [f64::INFINITY; N];
    for _ in 0..repeats {
        for (i, best) in best.iter_mut().enumerate() {
            let start = Instant::now();
            for _ in 0..calls[i] {
                run(i);
            }
            *best = best.min(start.elapsed().as_secs_f64() / calls[i] as f64);
        }
    }
    best
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
