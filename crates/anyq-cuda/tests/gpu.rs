//! GPU kernels against host references on random inputs of odd shapes. On a machine without a
//! GPU each test says so and returns, unless ANYQ_REQUIRE_GPU is set (scripts/gpu-check sets it),
//! which turns a missing GPU into a failure.

use anyq_core::testing::XorShift;
use anyq_cuda::mixq::{gemm_with, Kernel, MixqActivations, MixqWeight, OutlierSet, Producer, GEMV_MAX_TOKENS};
use anyq_cuda::testing::gpu_or_skip as device;
use anyq_cuda::{BlasGemm, CudaDevice, CudaError, Int8Gemm};
use half::f16;

#[test]
fn opening_a_missing_gpu_is_an_error_not_a_panic() {
    let err = CudaDevice::open(1 << 20).err().expect("GPU 2^20 cannot exist");
    assert!(matches!(err, CudaError::NoDriver | CudaError::NoDevice { .. }), "{err}");
    assert!(!err.to_string().is_empty());
}

/// ‖got − want‖ / ‖want‖.
fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

fn to_f64(bits: &[u16]) -> Vec<f64> {
    bits.iter().map(|&b| f16::from_bits(b).to_f64()).collect()
}

/// `count` channels spread evenly over `k`, in increasing order.
fn spread_channels(k: usize, count: usize) -> Vec<u32> {
    (0..count)
        .map(|i| ((i * k) / count.max(1) + 3) as u32 % k as u32)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    outliers: usize,
}

const CASES: &[Case] = &[
    Case { m: 1, n: 24, k: 200, outliers: 0 },
    Case { m: 3, n: 37, k: 333, outliers: 5 },
    Case { m: 16, n: 40, k: 256, outliers: 70 },
    Case { m: 17, n: 37, k: 333, outliers: 5 },
    Case { m: 130, n: 260, k: 520, outliers: 9 },
    Case { m: 300, n: 129, k: 1000, outliers: 0 },
    Case { m: 1030, n: 4104, k: 384, outliers: 40 },
    Case { m: 2100, n: 8200, k: 128, outliers: 100 },
    Case { m: 500, n: 6100, k: 256, outliers: 30 },
    Case { m: 9, n: 1000, k: 1024, outliers: 12 },
    // Enough 16-row tile pairs for the streaming GEMV to batch 2 and 8 of them, a lone tile in
    // the last pair and a short last stage.
    Case { m: 12, n: 4100, k: 1500, outliers: 33 },
    Case { m: 7, n: 16888, k: 640, outliers: 20 },
    // k past what fits in shared memory beside the streaming GEMVs' rings (16 and 8 tokens):
    // their activations come through L1 instead.
    Case { m: 12, n: 300, k: 5000, outliers: 50 },
    Case { m: 5, n: 300, k: 13000, outliers: 130 },
    // Few tiles over a long k: the one-block kernels split k unevenly (25 k tiles in 3 parts)
    // over two rows of tiles, the second's last 56 rows past the tokens.
    Case { m: 200, n: 300, k: 3200, outliers: 30 },
    // k split in two long parts for 64-column tiles (47 tiles): each tile's parts a cluster,
    // adding through distributed shared memory, the second warpgroup's rows past the tokens; in
    // five through the workspace for 128-column ones (24 tiles).
    Case { m: 40, n: 3000, k: 8192, outliers: 20 },
];

/// Random INT8 activations (zero at the outlier channels, as the producer leaves them), their
/// scales and FP16 outliers.
fn activations(rng: &mut XorShift, m: usize, k: usize, channels: &[u32]) -> (Vec<i8>, Vec<f32>, Vec<f16>) {
    let mut xq: Vec<i8> = rng.bytes(m * k).into_iter().map(|b| (b as i8).max(-127)).collect();
    for row in xq.chunks_mut(k) {
        for &c in channels {
            row[c as usize] = 0;
        }
    }
    let sx = (0..m).map(|_| 0.01 + 0.01 * rng.uniform().abs()).collect();
    let xo = (0..m * channels.len()).map(|_| f16::from_f32(8.0 * rng.uniform())).collect();
    (xq, sx, xo)
}

fn check_gemm(bits: u32, group: usize) {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(bits as u64 * 1000 + group as u64);
    for case in CASES {
        let &Case { m, n, k, outliers } = case;
        let channels = spread_channels(k, outliers);
        let ko = channels.len();
        let set = OutlierSet::new(&device, k, &channels).unwrap();
        let (xq, sx, xo) = activations(&mut rng, m, k, &channels);
        let wo: Vec<f16> = (0..n * ko).map(|_| f16::from_f32(0.05 * rng.uniform())).collect();
        // Dequantized weights for the reference.
        let mut w = vec![0.0f64; n * k];
        let weight = if bits == 8 {
            let q: Vec<i8> = rng.bytes(n * k).into_iter().map(|b| (b as i8).max(-127)).collect();
            let scales: Vec<f32> = (0..n).map(|_| 1e-3 * (1.0 + rng.uniform().abs())).collect();
            for (i, v) in w.iter_mut().enumerate() {
                *v = q[i] as f64 * scales[i / k] as f64;
            }
            MixqWeight::w8(&device, &q, &scales, (n, k), &set, &wo).unwrap()
        } else {
            let groups = k.div_ceil(group);
            let q: Vec<u8> = rng.bytes(n * k).into_iter().map(|b| b & 15).collect();
            let zeros: Vec<u8> = rng.bytes(n * groups).into_iter().map(|b| b & 15).collect();
            let scales: Vec<f32> = (0..n * groups).map(|_| 1e-2 * (1.0 + rng.uniform().abs())).collect();
            for (i, v) in w.iter_mut().enumerate() {
                let (row, col) = (i / k, i % k);
                let g = row * groups + col / group;
                *v = (q[i] as f64 - zeros[g] as f64) * scales[g] as f64;
            }
            MixqWeight::w4(&device, &q, &scales, &zeros, (n, k), group, &set, &wo).unwrap()
        };
        let acts = MixqActivations::from_host(&device, &set, &xq, &sx, &xo).unwrap();
        let mut want = vec![0.0f64; m * n];
        for t in 0..m {
            for j in 0..n {
                let bulk: f64 = (0..k).map(|c| xq[t * k + c] as f64 * w[j * k + c]).sum();
                let outlier: f64 = (0..ko).map(|o| xo[t * ko + o].to_f64() * wo[j * ko + o].to_f64()).sum();
                want[t * n + j] = sx[t] as f64 * bulk + outlier;
            }
        }
        let mut kernels = vec![Kernel::Mma];
        if m <= GEMV_MAX_TOKENS {
            kernels.push(Kernel::Gemv);
        }
        if device.compute_capability() == (9, 0) {
            kernels.push(Kernel::Stream);
            if bits == 4 {
                kernels.extend([Kernel::StreamResident, Kernel::Tma]);
            }
        }
        if bits == 8 && device.compute_capability() == (9, 0) {
            kernels.extend([
                Kernel::Tma,
                Kernel::TmaNarrow,
                Kernel::TmaPair128,
                Kernel::TmaPair192,
                Kernel::TmaPair256,
            ]);
        }
        for kernel in kernels {
            // Poison: every output element must be written.
            let mut y = device.upload(&vec![f16::NAN.to_bits(); m * n]).unwrap();
            gemm_with(&device, &weight, &acts, &mut y, kernel).unwrap();
            let got = to_f64(&device.download(&y).unwrap());
            let case = format!("W{bits} g{group} {kernel:?} m={m} n={n} k={k} outliers={ko}");
            assert!(got.iter().all(|v| v.is_finite()), "{case}: unwritten or non-finite output");
            let err = relative_error(&got, &want);
            assert!(err < 2e-3, "{case}: relative error {err:.2e}");
        }
    }
}

#[test]
fn w8a8_gemm_with_outliers_matches_the_host() {
    check_gemm(8, 0);
}

#[test]
fn w4a8_gemm_with_outliers_matches_the_host() {
    check_gemm(4, 128);
    check_gemm(4, 256);
}

/// The producer's output against the host: same scales, INT8 values off by at most one step
/// (rounding of values that sit on a boundary), outliers gathered in order, padding zero.
fn check_producer(mode: &str) {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(11);
    // The last row is longer than the kernel keeps in registers: the looping path.
    for &(m, k, outliers) in &[(1usize, 64usize, 0usize), (5, 333, 7), (33, 4100, 41), (2, 16500, 120)] {
        let channels = spread_channels(k, outliers);
        let ko = channels.len();
        let set = OutlierSet::new(&device, k, &channels).unwrap();
        // RMSNorm reads an f32 residual row and an f32 weight; SiLU·up an f16 row [gate | up];
        // plain an f16 row.
        let to_f16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| f16::from_f32(x).to_bits()).collect() };
        let x: Vec<f32> = (0..m * k).map(|_| 2.0 * rng.uniform()).collect();
        let gamma: Vec<f32> = (0..k).map(|_| 1.0 + 0.5 * rng.uniform()).collect();
        let up: Vec<f32> = (0..m * k).map(|_| 1.0 + 0.5 * rng.uniform()).collect();
        let xh = to_f16(&x);
        let gate_up: Vec<u16> =
            (0..m).flat_map(|t| xh[t * k..][..k].iter().copied().chain(to_f16(&up[t * k..][..k]))).collect();
        let eps = 1e-5;
        let y: Vec<f64> = (0..m * k)
            .map(|i| match mode {
                "rmsnorm" => {
                    let row = &x[i / k * k..][..k];
                    let rinv = 1.0 / (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64 + eps).sqrt();
                    x[i] as f64 * rinv * gamma[i % k] as f64
                }
                "silu" => {
                    let (g, u) = (f16::from_bits(xh[i]).to_f64(), f16::from_bits(to_f16(&up[i..i + 1])[0]).to_f64());
                    g / (1.0 + (-g).exp()) * u
                }
                _ => f16::from_bits(xh[i]).to_f64(),
            })
            .collect();
        let (xd, xhd, gd, gud) = (
            device.upload(&x).unwrap(),
            device.upload(&xh).unwrap(),
            device.upload(&gamma).unwrap(),
            device.upload(&gate_up).unwrap(),
        );
        let mut acts = MixqActivations::new(&device, m + 3, &set).unwrap();
        let producer = match mode {
            "rmsnorm" => Producer::RmsNorm { x: &xd, gamma: &gd, eps: eps as f32 },
            "silu" => Producer::SiluMul { gate_up: &gud },
            _ => Producer::Plain { x: &xhd },
        };
        acts.produce(&device, producer, m, 0.5).unwrap();
        let (xq, sx, xo) = acts.download(&device).unwrap();
        let (k_pad, ko_pad) = (acts.padded_k(), set.padded_len());
        let mut over = 0;
        for t in 0..m {
            let row = &y[t * k..][..k];
            let amax = (0..k).filter(|c| !channels.contains(&(*c as u32))).map(|c| row[c].abs()).fold(0.0, f64::max);
            over += (amax > 0.5) as u32;
            let scale = amax / 127.0;
            assert!((sx[t] as f64 - scale).abs() <= 1e-4 * scale, "{mode} token {t}: scale {} vs {scale}", sx[t]);
            for c in 0..k_pad {
                let q = xq[t * k_pad + c] as f64;
                if c >= k || channels.contains(&(c as u32)) {
                    assert_eq!(q, 0.0, "{mode} token {t} channel {c} must be zero");
                } else {
                    assert!(
                        (q - row[c] / scale).abs() <= 1.0,
                        "{mode} token {t} channel {c}: {q} vs {}",
                        row[c] / scale
                    );
                }
            }
            for o in 0..ko_pad {
                let got = f16::from_bits(xo[t * ko_pad + o]).to_f64();
                let want = if o < ko { row[channels[o] as usize] } else { 0.0 };
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs() + 1e-6,
                    "{mode} token {t} outlier {o}: {got} vs {want}"
                );
            }
        }
        assert_eq!(acts.over_threshold(&device).unwrap(), over, "{mode}: tokens over the threshold");
    }
}

#[test]
fn producer_rmsnorm_quantizes_and_gathers_like_the_host() {
    check_producer("rmsnorm");
}

#[test]
fn producer_silu_mul_quantizes_and_gathers_like_the_host() {
    check_producer("silu");
}

#[test]
fn producer_plain_quantizes_and_gathers_like_the_host() {
    check_producer("plain");
}

#[test]
fn cublas_peers_compute_the_product() {
    let Some(device) = device() else { return };
    let (m, n, k) = (33, 72, 128);
    let mut rng = XorShift::new(21);
    let x: Vec<i8> = rng.bytes(m * k).into_iter().map(|b| b as i8).collect();
    let w: Vec<i8> = rng.bytes(n * k).into_iter().map(|b| b as i8).collect();
    let mut lt = Int8Gemm::new(&device, (m, n, k)).unwrap();
    let mut y = device.zeros::<i32>(m * n).unwrap();
    lt.run(&device.upload(&x).unwrap(), &device.upload(&w).unwrap(), &mut y).unwrap();
    let got = device.download(&y).unwrap();
    for t in 0..m {
        for j in 0..n {
            let want: i32 = (0..k).map(|c| x[t * k + c] as i32 * w[j * k + c] as i32).sum();
            assert_eq!(got[t * n + j], want, "cuBLASLt INT8 at ({t}, {j})");
        }
    }
    let xf: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v as f32 / 64.0)).collect();
    let wf: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v as f32 / 64.0)).collect();
    let blas = BlasGemm::new(&device).unwrap();
    let mut yb = device.zeros::<half::bf16>(m * n).unwrap();
    blas.bf16(&device.upload(&xf).unwrap(), &device.upload(&wf).unwrap(), &mut yb, (m, n, k)).unwrap();
    let got: Vec<f64> = device.download(&yb).unwrap().iter().map(|v| v.to_f64()).collect();
    let want: Vec<f64> =
        (0..m * n).map(|i| (0..k).map(|c| xf[i / n * k + c].to_f64() * wf[i % n * k + c].to_f64()).sum()).collect();
    assert!(relative_error(&got, &want) < 1e-2);
}
