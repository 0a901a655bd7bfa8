//! `anyq bench gemm`: the fused MixQ GEMMs against cuBLAS BF16 and cuBLASLt INT8, measured in the
//! same run on the same GPU, at LLaMA-3-8B's linear-layer shapes.

use std::sync::Arc;

use anyq_cuda::mixq::{self, Kernel, MixqActivations, MixqWeight, OutlierSet, GEMV_MAX_TOKENS};
use anyq_cuda::{BlasGemm, CudaDevice, Int8Gemm, Timer};
use clap::Args;

use crate::bench_kernels::parse_shape;

#[derive(Args)]
pub struct GemmBenchArgs {
    /// Weight shapes as KxN (in × out); the default is LLaMA-3-8B's qkv, gate+up and down.
    #[arg(long, value_delimiter = ',', default_value = "4096x6144,4096x28672,14336x4096")]
    shapes: Vec<String>,
    /// Tokens per product.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256,512,1024,4096")]
    m: Vec<usize>,
    /// Outlier channels, in percent of k.
    #[arg(long, value_delimiter = ',', default_value = "0,0.5,1")]
    outliers: Vec<f64>,
    /// Timed samples per product (the median is reported).
    #[arg(long, default_value_t = 9)]
    samples: usize,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// MixQ W8A8 kernel above 16 tokens: auto, mma, tma, tma-64, tma-pair-128, tma-pair-192 or tma-pair-256.
    #[arg(long, default_value = "auto")]
    kernel: String,
    /// MixQ W4A8 kernel up to 16 tokens: auto, gemv, stream or stream-resident.
    #[arg(long, default_value = "auto")]
    gemv_kernel: String,
    /// MixQ W4A8 kernel above 16 tokens: auto, stream (passes of 16 tokens), tma or mma.
    #[arg(long, default_value = "auto")]
    w4_kernel: String,
}

/// Enough copies of each operand that one pass over them exceeds the L2 cache several times:
/// every timed call reads its weights from device memory, as in a model.
const ROTATION_BYTES: usize = 256 << 20;

fn copies(bytes: usize) -> usize {
    ROTATION_BYTES.div_ceil(bytes.max(1)).clamp(1, 16)
}

/// A product to time: `run(i)` makes one call, `i` cycling over the operand copies it owns.
type Timed<'a> = Box<dyn FnMut(usize) -> anyhow::Result<()> + 'a>;

/// Median milliseconds per call of each product. Samples of each (enough back-to-back calls to
/// last about 2 ms) are taken in turns, after a first turn of about 30 ms each: a change of the
/// GPU's clock or temperature during the measurement then falls on all products alike (timed
/// one after another, the first product measured after a heavier one ran up to 15% slow).
fn median_ms(device: &CudaDevice, samples: usize, products: &mut [Timed]) -> anyhow::Result<Vec<f64>> {
    let mut calls = Vec::with_capacity(products.len());
    for run in products.iter_mut() {
        for i in 0..3 {
            run(i)?;
        }
        let probe = Timer::start(device)?;
        run(0)?;
        let once = probe.elapsed_ms()? as f64;
        calls.push(((2.0 / once.max(1e-3)).ceil() as usize).clamp(1, 2000));
    }
    let mut times = vec![Vec::with_capacity(samples); products.len()];
    for turn in 0..=samples.max(1) {
        for ((run, &calls), times) in products.iter_mut().zip(&calls).zip(&mut times) {
            let warm_up = turn == 0;
            let timer = Timer::start(device)?;
            for i in 0..if warm_up { 15 * calls } else { calls } {
                run(i)?;
            }
            let ms = timer.elapsed_ms()? as f64;
            if !warm_up {
                times.push(ms / calls as f64);
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

/// The kernel named `value` for option `--{option}` among `choices`.
fn kernel_choice(option: &str, value: &str, choices: &[(&str, Kernel)]) -> anyhow::Result<Kernel> {
    match choices.iter().find(|(name, _)| *name == value) {
        Some(&(_, kernel)) => Ok(kernel),
        None => {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            anyhow::bail!("unknown --{option} {value:?}: expected one of {}", names.join(", "))
        }
    }
}

pub fn gemm(args: GemmBenchArgs) -> anyhow::Result<()> {
    let shapes = args.shapes.iter().map(|s| parse_shape(s)).collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(args.m.iter().all(|&m| m > 0), "--m values must be > 0");
    anyhow::ensure!(args.outliers.iter().all(|p| (0.0..=50.0).contains(p)), "--outliers are percentages in 0..50");
    let w8_kernel = kernel_choice(
        "kernel",
        &args.kernel,
        &[
            ("auto", Kernel::Auto),
            ("mma", Kernel::Mma),
            ("tma", Kernel::Tma),
            ("tma-64", Kernel::TmaNarrow),
            ("tma-pair-128", Kernel::TmaPair128),
            ("tma-pair-192", Kernel::TmaPair192),
            ("tma-pair-256", Kernel::TmaPair256),
        ],
    )?;
    let w4_gemv_kernel = kernel_choice(
        "gemv-kernel",
        &args.gemv_kernel,
        &[
            ("auto", Kernel::Auto),
            ("gemv", Kernel::Gemv),
            ("stream", Kernel::Stream),
            ("stream-resident", Kernel::StreamResident),
        ],
    )?;
    let w4_large_kernel = kernel_choice(
        "w4-kernel",
        &args.w4_kernel,
        &[("auto", Kernel::Auto), ("stream", Kernel::Stream), ("tma", Kernel::Tma), ("mma", Kernel::Mma)],
    )?;
    let device = CudaDevice::open(args.gpu)?;
    let blas = BlasGemm::new(&device)?;
    let (major, minor) = device.compute_capability();
    println!("GPU: {} (sm_{major}{minor}, {} SMs)", device.name(), device.sm_count());
    println!("TOP/s count 2·m·n·k for every product (the outlier channels' extra work is not credited).");
    println!("MixQ: INT8 MMA + FP16 outlier MMA, dequantized in the epilogue, f16 out; W4A8 in groups of 128.");
    println!(
        "W8A8 kernel above {GEMV_MAX_TOKENS} tokens: {}; W4A8 kernel up to {GEMV_MAX_TOKENS}: {}, above: {}.\n",
        args.kernel, args.gemv_kernel, args.w4_kernel
    );
    println!("| K×N | M | outliers | cuBLAS BF16 TFLOP/s | cuBLASLt INT8 TOP/s | MixQ W8A8 TOP/s | W8A8 / BF16 | W8A8 / INT8 | MixQ W4A8 TOP/s | W4A8 / BF16 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &(k, n) in &shapes {
        for &m in &args.m {
            let ops = 2.0 * (m * n * k) as f64;
            let rate = |ms: f64| ops / (ms * 1e-3) / 1e12;
            // cuBLAS BF16, cuBLASLt INT8, then W8A8 and W4A8 at each outlier share, timed in turns.
            let mut products = vec![bf16_product(&device, &blas, (m, n, k))?, int8_product(&device, (m, n, k))?];
            for &percent in &args.outliers {
                let count = ((percent / 100.0) * k as f64).round() as usize;
                let channels: Vec<u32> = (0..count).map(|i| (i * k / count.max(1)) as u32).collect();
                let set = OutlierSet::new(&device, k, &channels)?;
                let w8_kernel = if m > GEMV_MAX_TOKENS { w8_kernel } else { Kernel::Auto };
                let w4_kernel = if m > GEMV_MAX_TOKENS { w4_large_kernel } else { w4_gemv_kernel };
                products.push(mixq_product(&device, 8, w8_kernel, &set, (m, n, k))?);
                products.push(mixq_product(&device, 4, w4_kernel, &set, (m, n, k))?);
            }
            let ms = median_ms(&device, args.samples, &mut products)?;
            let (bf16, int8) = (ms[0], ms[1]);
            for (&percent, mixq) in args.outliers.iter().zip(ms[2..].chunks(2)) {
                let (w8, w4) = (mixq[0], mixq[1]);
                println!(
                    "| {k}×{n} | {m} | {percent}% | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} |",
                    rate(bf16),
                    rate(int8),
                    rate(w8),
                    bf16 / w8,
                    int8 / w8,
                    rate(w4),
                    bf16 / w4
                );
            }
        }
    }
    Ok(())
}

fn bf16_product<'a>(
    device: &'a Arc<CudaDevice>,
    blas: &'a BlasGemm,
    (m, n, k): (usize, usize, usize),
) -> anyhow::Result<Timed<'a>> {
    let count = copies(n * k * 2);
    let mut x = device.zeros::<half::bf16>(m * k)?;
    mixq::fill_bf16(device, &mut x, 1, 1.0)?;
    let mut weights = Vec::with_capacity(count);
    for i in 0..count {
        let mut w = device.zeros::<half::bf16>(n * k)?;
        mixq::fill_bf16(device, &mut w, 100 + i as u64, 0.05)?;
        weights.push(w);
    }
    let mut y = device.zeros::<half::bf16>(m * n)?;
    Ok(Box::new(move |i| Ok(blas.bf16(&x, &weights[i % count], &mut y, (m, n, k))?)))
}

fn int8_product(device: &Arc<CudaDevice>, (m, n, k): (usize, usize, usize)) -> anyhow::Result<Timed<'static>> {
    let count = copies(n * k);
    let mut lt = Int8Gemm::new(device, (m, n, k))?;
    let mut x = device.zeros::<i8>(m * k)?;
    mixq::fill_bytes(device, &mut x, 2)?;
    let mut weights = Vec::with_capacity(count);
    for i in 0..count {
        let mut w = device.zeros::<i8>(n * k)?;
        mixq::fill_bytes(device, &mut w, 200 + i as u64)?;
        weights.push(w);
    }
    let mut y = device.zeros::<i32>(m * n)?;
    Ok(Box::new(move |i| Ok(lt.run(&x, &weights[i % count], &mut y)?)))
}

fn mixq_product(
    device: &Arc<CudaDevice>,
    bits: u32,
    kernel: Kernel,
    set: &Arc<OutlierSet>,
    (m, n, k): (usize, usize, usize),
) -> anyhow::Result<Timed<'static>> {
    let count = copies(n * k * bits as usize / 8);
    let acts = MixqActivations::random(device, m, set, 3)?;
    let weights = (0..count)
        .map(|i| MixqWeight::random(device, bits, (n, k), set, 300 + i as u64))
        .collect::<anyq_cuda::Result<Vec<_>>>()?;
    let mut y = device.zeros::<u16>(m * n)?;
    let device = device.clone();
    Ok(Box::new(move |i| Ok(mixq::gemm_with(&device, &weights[i % count], &acts, &mut y, kernel)?)))
}
