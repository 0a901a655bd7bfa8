//! The integer kernels against their plain references: every kernel this CPU can run (not only
//! the one `detect` picks), on odd shapes, extreme values, with and without bias and
//! accumulation, W4A8 with and without zero points and with a shorter last group, and on 1 and
//! 2 threads. The kernels follow the references' order of f32 operations, so outputs must match
//! bit for bit.

use anyq_core::cpu::int8::{
    gemm_i8_i32_reference, gemm_w4a8_reference, gemm_w4a8_with, gemm_w8a8_reference, gemm_w8a8_with, quantize_rows_i8,
    quantize_rows_i8_outside, I4Weight, I8Weight, IntKernel,
};
use anyq_core::cpu::{matmul_xwt_reference, ChannelSet};
use anyq_core::testing::XorShift;

const MS: [usize; 8] = [1, 2, 3, 5, 16, 33, 64, 130];
const NS: [usize; 5] = [1, 7, 37, 100, 576];
const KS: [usize; 5] = [32, 64, 96, 576, 1536];

fn kernels() -> Vec<IntKernel> {
    let (run, skip): (Vec<_>, Vec<_>) = IntKernel::ALL.into_iter().partition(|k| k.is_supported());
    if !skip.is_empty() {
        eprintln!("this CPU cannot run {skip:?}: not tested");
    }
    run
}

fn i8s(rng: &mut XorShift, len: usize, lo: i8, hi: i8) -> Vec<i8> {
    let span = (hi as i32 - lo as i32 + 1) as u64;
    (0..len).map(|_| (lo as i64 + (rng.next_u64() % span) as i64) as i8).collect()
}

/// Scales spread over a few octaves, of both signs (nothing in the kernels assumes them positive).
fn scales(rng: &mut XorShift, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.uniform() * 0.01 + 0.002 * rng.uniform().signum()).collect()
}

fn assert_identical(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(a.to_bits() == b.to_bits(), "{what}: element {i}: {a} vs reference {b}");
    }
}

struct Case {
    x: Vec<i8>,
    x_scales: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// What `out` holds before the call (used when accumulating).
    init: Vec<f32>,
    accumulate: bool,
}

impl Case {
    fn new(rng: &mut XorShift, m: usize, n: usize, k: usize, variant: usize) -> Self {
        Self {
            x: i8s(rng, m * k, -127, 127),
            x_scales: scales(rng, m),
            bias: (variant & 1 == 1).then(|| rng.floats(n)),
            init: rng.floats(m * n),
            accumulate: variant & 2 == 2,
        }
    }
}

fn check_w8a8(kernel: IntKernel, case: &Case, wq: &[i8], w_scales: &[f32], m: usize, n: usize, k: usize) {
    let w = I8Weight::new(wq, w_scales, n, k);
    let bias = case.bias.as_deref();
    let mut want = case.init.clone();
    gemm_w8a8_reference(&case.x, &case.x_scales, wq, w_scales, bias, &mut want, m, n, k, case.accumulate);
    let mut got = case.init.clone();
    gemm_w8a8_with(kernel, &case.x, &case.x_scales, &w, bias, &mut got, m, case.accumulate);
    let what = format!("{kernel:?} W8A8 m={m} n={n} k={k} bias={} acc={}", bias.is_some(), case.accumulate);
    assert_identical(&got, &want, &what);
}

/// An int4 weight as `I4Weight::new` takes it.
struct W4 {
    q: Vec<i8>,
    scales: Vec<f32>,
    zeros: Option<Vec<i8>>,
    group: usize,
}

impl W4 {
    /// Random values and scales `[n, ⌈k/group⌉]`, and zero points if `zeros`.
    fn random(rng: &mut XorShift, n: usize, k: usize, group: usize, zeros: bool) -> Self {
        let groups = n * k.div_ceil(group);
        let (q, scales) = (i8s(rng, n * k, -8, 7), scales(rng, groups));
        Self { q, scales, zeros: zeros.then(|| i8s(rng, groups, -8, 7)), group }
    }

    fn packed(&self, n: usize, k: usize) -> I4Weight {
        I4Weight::new(&self.q, &self.scales, self.zeros.as_deref(), n, k, self.group)
    }
}

fn check_w4a8(kernel: IntKernel, case: &Case, w: &W4, m: usize, n: usize, k: usize) {
    let (bias, zeros, g) = (case.bias.as_deref(), w.zeros.as_deref(), w.group);
    let mut want = case.init.clone();
    let (x, xs) = (&case.x, &case.x_scales);
    gemm_w4a8_reference(x, xs, &w.q, &w.scales, zeros, g, bias, &mut want, m, n, k, case.accumulate);
    let mut got = case.init.clone();
    gemm_w4a8_with(kernel, x, xs, &w.packed(n, k), bias, &mut got, m, case.accumulate);
    let what = format!(
        "{kernel:?} W4A8 m={m} n={n} k={k} g={g} zeros={} bias={} acc={}",
        zeros.is_some(),
        bias.is_some(),
        case.accumulate
    );
    assert_identical(&got, &want, &what);
}

#[test]
fn w8a8_matches_reference_on_odd_shapes() {
    let kernels = kernels();
    let mut variant = 0;
    for &k in &KS {
        for &n in &NS {
            let mut rng = XorShift::new((n * 7919 + k) as u64);
            let wq = i8s(&mut rng, n * k, -127, 127);
            let w_scales = scales(&mut rng, n);
            for &m in &MS {
                // Bias and accumulation cycle over the shapes, so every combination meets every size.
                variant += 1;
                let case = Case::new(&mut rng, m, n, k, variant);
                for &kernel in &kernels {
                    check_w8a8(kernel, &case, &wq, &w_scales, m, n, k);
                }
            }
        }
    }
}

#[test]
fn w8a8_handles_k_not_a_multiple_of_4() {
    for &(m, n, k) in &[(1, 5, 1), (3, 17, 7), (7, 33, 33), (13, 70, 130)] {
        let mut rng = XorShift::new((m * 100 + k) as u64);
        let wq = i8s(&mut rng, n * k, -127, 127);
        let w_scales = scales(&mut rng, n);
        for variant in 0..4 {
            let case = Case::new(&mut rng, m, n, k, variant);
            for kernel in kernels() {
                check_w8a8(kernel, &case, &wq, &w_scales, m, n, k);
            }
        }
    }
}

#[test]
fn w4a8_matches_reference_on_odd_shapes() {
    let kernels = kernels();
    let mut variant = 0;
    for &k in &KS {
        for &n in &NS {
            let mut rng = XorShift::new((n * 104_729 + k) as u64);
            for &m in &MS {
                variant += 1;
                // Group sizes in turn, dividing k or not (576 = 4·128 + 64; 32 = one short group
                // of 128), with and without zero points.
                let g = [32, 64, 128][variant % 3];
                let w = W4::random(&mut rng, n, k, g, variant / 4 % 2 == 1);
                let case = Case::new(&mut rng, m, n, k, variant);
                for &kernel in &kernels {
                    check_w4a8(kernel, &case, &w, m, n, k);
                }
            }
        }
    }
}

/// Group sizes that leave a shorter last group (or are longer than k), down to one line (8) and
/// up past the AVX2 kernel's 4-line i16 runs, with and without zero points.
#[test]
fn w4a8_shorter_last_group_with_and_without_zeros() {
    let kernels = kernels();
    let mut variant = 0;
    for &(k, groups) in &[(8, [8, 16, 128]), (24, [16, 40, 64]), (200, [8, 48, 136]), (1000, [40, 96, 128])] {
        for &g in &groups {
            for &n in &[1, 17, 45] {
                for &m in &[1, 4, 7] {
                    variant += 1;
                    let mut rng = XorShift::new((variant * 31 + k) as u64);
                    let w = W4::random(&mut rng, n, k, g, variant % 2 == 0);
                    let case = Case::new(&mut rng, m, n, k, variant / 2);
                    for &kernel in &kernels {
                        check_w4a8(kernel, &case, &w, m, n, k);
                    }
                }
            }
        }
    }
}

/// A named way to fill a tensor, from the element's index.
type Fill = (&'static str, Box<dyn Fn(usize) -> i8>);

/// Extremes catch the u8 offset (x = −127 or −128 becomes u8 1 or 0), i16 saturation of
/// `vpmaddubsw` (|x|·|w| at its largest in both of a pair) and the sign trick. Unit scales make
/// each output the i32 sum itself, converted once, so it must equal the integer reference.
#[test]
fn extreme_values_give_exact_integer_sums() {
    let (m, n, k) = (5, 37, 1536);
    let mut rng = XorShift::new(99);
    let fills_x: [Fill; 5] = [
        ("x=127", Box::new(|_| 127)),
        ("x=-127", Box::new(|_| -127)),
        ("x=-128", Box::new(|_| -128)),
        ("x=±127", Box::new(|i| if i % 3 == 0 { 127 } else { -127 })),
        ("x=0", Box::new(|_| 0)),
    ];
    let w8_fills: [Fill; 4] = [
        ("w=127", Box::new(|_| 127)),
        ("w=-127", Box::new(|_| -127)),
        ("w=±127", Box::new(|i| if i % 2 == 0 { 127 } else { -127 })),
        ("w=random", Box::new(|i| ((i * 2_654_435_761) % 255) as i8)),
    ];
    let w4_fills: [Fill; 3] = [
        ("w=7", Box::new(|_| 7)),
        ("w=-8", Box::new(|_| -8)),
        ("w=-8/7", Box::new(|i| if i % 5 < 2 { -8 } else { 7 })),
    ];
    let ones_m = vec![1.0f32; m];
    let init = rng.floats(m * n);
    for kernel in kernels() {
        for (xname, fx) in &fills_x {
            let x: Vec<i8> = (0..m * k).map(fx).collect();
            for (wname, fw) in &w8_fills {
                let wq: Vec<i8> = (0..n * k).map(|i| fw(i).max(-127)).collect();
                let want: Vec<f32> = gemm_i8_i32_reference(&x, &wq, m, n, k).iter().map(|&s| s as f32).collect();
                let w = I8Weight::new(&wq, &vec![1.0; n], n, k);
                let mut got = init.clone();
                gemm_w8a8_with(kernel, &x, &ones_m, &w, None, &mut got, m, false);
                assert_identical(&got, &want, &format!("{kernel:?} W8A8 {xname} {wname}"));
            }
            for (wname, fw) in &w4_fills {
                let wq: Vec<i8> = (0..n * k).map(fw).collect();
                // Groups that divide k and one that does not (1536 = 38·40 + 16); zero points at
                // both ends of their range, so that w − z reaches ±15.
                for g in [32, 40, 64, 128] {
                    let groups = n * k.div_ceil(g);
                    let zero_fills: [(&str, Option<Vec<i8>>); 4] = [
                        ("symmetric", None),
                        ("z=-8", Some(vec![-8; groups])),
                        ("z=7", Some(vec![7; groups])),
                        ("z=7/-8", Some((0..groups).map(|i| if i % 3 == 0 { 7 } else { -8 }).collect())),
                    ];
                    for (zname, zeros) in &zero_fills {
                        let zero_of = |i: usize| zeros.as_ref().map_or(0, |z| z[i / k * k.div_ceil(g) + i % k / g]);
                        let w_minus_z: Vec<i8> = wq.iter().enumerate().map(|(i, &v)| v - zero_of(i)).collect();
                        let want = gemm_i8_i32_reference(&x, &w_minus_z, m, n, k);
                        let want: Vec<f32> = want.iter().map(|&s| s as f32).collect();
                        let w = I4Weight::new(&wq, &vec![1.0; groups], zeros.as_deref(), n, k, g);
                        let mut got = init.clone();
                        gemm_w4a8_with(kernel, &x, &ones_m, &w, None, &mut got, m, false);
                        assert_identical(&got, &want, &format!("{kernel:?} W4A8 g={g} {xname} {wname} {zname}"));
                    }
                }
            }
        }
    }
}

#[test]
fn extreme_values_with_bias_and_accumulation() {
    let mut rng = XorShift::new(7);
    for &(m, n, k) in &[(1, 576, 576), (64, 100, 1536), (33, 7, 96)] {
        for (xv, wv) in [(127i8, 127i8), (-127, 127), (-127, -127), (-128, -127)] {
            let w8 = vec![wv; n * k];
            let w_scales = scales(&mut rng, n);
            let q4 = vec![if wv > 0 { 7 } else { -8 }; n * k];
            let w4 = W4 { q: q4.clone(), scales: scales(&mut rng, n * k / 32), zeros: None, group: 32 };
            // Zero points at the other end: w − z = ±15, in groups of 40 that do not divide k.
            let groups = n * k.div_ceil(40);
            let zeros = vec![if wv > 0 { -8 } else { 7 }; groups];
            let w4z = W4 { q: q4, scales: scales(&mut rng, groups), zeros: Some(zeros), group: 40 };
            for variant in 0..4 {
                let mut case = Case::new(&mut rng, m, n, k, variant);
                case.x.fill(xv);
                for kernel in kernels() {
                    check_w8a8(kernel, &case, &w8, &w_scales, m, n, k);
                    check_w4a8(kernel, &case, &w4, m, n, k);
                    check_w4a8(kernel, &case, &w4z, m, n, k);
                }
            }
        }
    }
}

/// Every output element is computed by one tile in a fixed order, whatever the thread count.
#[test]
fn results_do_not_depend_on_thread_count() {
    let pool = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let (one, two, three) = (pool(1), pool(2), pool(3));
    for &(m, n, k) in &[(1, 1536, 576), (1, 576, 1536), (16, 576, 576), (64, 576, 576), (130, 100, 1536)] {
        let mut rng = XorShift::new((m + n + k) as u64);
        let case = Case::new(&mut rng, m, n, k, 3);
        let w8 = I8Weight::new(&i8s(&mut rng, n * k, -127, 127), &scales(&mut rng, n), n, k);
        let w4 = W4::random(&mut rng, n, k, 64, false).packed(n, k);
        let w4z = W4::random(&mut rng, n, k, 128, true).packed(n, k);
        for kernel in kernels() {
            let run = |pool: &rayon::ThreadPool| {
                pool.install(|| {
                    let (mut a, mut b, mut c) = (case.init.clone(), case.init.clone(), case.init.clone());
                    let bias = case.bias.as_deref();
                    gemm_w8a8_with(kernel, &case.x, &case.x_scales, &w8, bias, &mut a, m, true);
                    gemm_w4a8_with(kernel, &case.x, &case.x_scales, &w4, bias, &mut b, m, true);
                    gemm_w4a8_with(kernel, &case.x, &case.x_scales, &w4z, bias, &mut c, m, true);
                    (a, b, c)
                })
            };
            let (a1, b1, c1) = run(&one);
            for (threads, pool) in [(2, &two), (3, &three)] {
                let (a, b, c) = run(pool);
                assert_identical(&a, &a1, &format!("{kernel:?} W8A8 ({m},{n},{k}) on {threads} threads vs 1"));
                assert_identical(&b, &b1, &format!("{kernel:?} W4A8 ({m},{n},{k}) on {threads} threads vs 1"));
                assert_identical(&c, &c1, &format!("{kernel:?} W4A8 zeros ({m},{n},{k}) on {threads} threads vs 1"));
            }
        }
    }
}

#[test]
fn packing_round_trips() {
    let mut rng = XorShift::new(5);
    for &(n, k) in &[(1, 32), (7, 96), (37, 64), (100, 576)] {
        let q8 = i8s(&mut rng, n * k, -127, 127);
        let s8 = scales(&mut rng, n);
        let w8 = I8Weight::new(&q8, &s8, n, k);
        assert_eq!((w8.n(), w8.k()), (n, k));
        assert_eq!(w8.values(), q8);
        assert_eq!(w8.scales(), &s8[..]);
        assert!(w8.bytes() >= n * k);

        // 40 divides none of the k: a shorter last group (all of k, for k = 32).
        for (g, zeros) in [(32, false), (32, true), (40, false), (40, true)] {
            let w = W4::random(&mut rng, n, k, g, zeros);
            let w4 = w.packed(n, k);
            assert_eq!((w4.n(), w4.k(), w4.group(), w4.groups()), (n, k, g, k.div_ceil(g)));
            assert_eq!(w4.values(), w.q);
            assert_eq!(w4.scales(), w.scales);
            assert_eq!(w4.zeros(), w.zeros);
            assert!(w4.bytes() >= n * k / 2 && w4.bytes() < n.div_ceil(16) * 16 * k);
        }
    }
}

#[test]
fn quantize_rows_follows_its_definition() {
    let (rows, cols) = (4, 37);
    let mut rng = XorShift::new(11);
    let mut x = rng.floats(rows * cols);
    x[cols..2 * cols].fill(0.0); // an all-zero row gets scale 1
    x[2 * cols + 5] = -3.0; // a row whose extreme is negative
    let (mut q, mut s) = (vec![0i8; rows * cols], vec![0.0f32; rows]);
    quantize_rows_i8(&x, rows, cols, &mut q, &mut s);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let amax = row.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        assert_eq!(s[r], scale, "row {r}");
        for (c, &v) in row.iter().enumerate() {
            let want = (v * (1.0 / scale)).round_ties_even().clamp(-127.0, 127.0) as i8;
            assert_eq!(q[r * cols + c], want, "row {r} col {c}: {v}");
        }
    }
    assert_eq!(q[2 * cols + 5], -127);
}

#[test]
fn quantize_rows_outside_a_set_is_quantize_rows_with_the_set_zeroed() {
    // 130 × 576 runs on several threads, the others on one.
    for (rows, cols) in [(1, 1), (3, 37), (5, 576), (130, 576)] {
        let mut rng = XorShift::new(rows as u64);
        let mut x = rng.floats(rows * cols);
        let members: Vec<usize> = (0..cols).filter(|j| j % 9 == 4).collect();
        for row in x.chunks_exact_mut(cols) {
            members.iter().for_each(|&j| row[j] *= 100.0);
        }
        let mut zeroed = x.clone();
        for row in zeroed.chunks_exact_mut(cols) {
            members.iter().for_each(|&j| row[j] = 0.0);
        }
        let (mut want_q, mut want_s) = (vec![0i8; rows * cols], vec![0.0f32; rows]);
        quantize_rows_i8(&zeroed, rows, cols, &mut want_q, &mut want_s);
        let amax: Vec<f32> = zeroed.chunks_exact(cols).map(|r| r.iter().fold(0.0f32, |a, v| a.max(v.abs()))).collect();
        let (mut q, mut s) = (vec![1i8; rows * cols], vec![0.0f32; rows]);
        quantize_rows_i8_outside(&x, rows, cols, &amax, &ChannelSet::new(cols, &members), &mut q, &mut s);
        assert_eq!((&q, &s), (&want_q, &want_s), "{rows}x{cols}");
        // A larger amax (a set that grew after the scan) only coarsens the scale.
        let doubled: Vec<f32> = amax.iter().map(|a| 2.0 * a).collect();
        quantize_rows_i8_outside(&x, rows, cols, &doubled, &ChannelSet::new(cols, &members), &mut q, &mut s);
        assert!(s.iter().zip(&want_s).all(|(s, w)| *s == 2.0 * w || *w == 1.0), "{rows}x{cols}: {s:?}");
    }
}

/// End to end on real-valued data: quantize x per token and W per channel (or per group); the
/// kernels' product equals the f32 product of the dequantized operands up to f32 rounding, and
/// is near the unquantized product.
#[test]
fn quantized_product_approximates_f32_product() {
    let (m, n, k, g) = (9, 70, 576, 32);
    let mut rng = XorShift::new(3);
    let x = rng.floats(m * k);
    let w = rng.floats(n * k);
    let exact = matmul_xwt_reference(&x, &w, m, n, k);
    let rms = (exact.iter().map(|v| v * v).sum::<f32>() / exact.len() as f32).sqrt();
    let (mut xq, mut xs) = (vec![0i8; m * k], vec![0.0; m]);
    quantize_rows_i8(&x, m, k, &mut xq, &mut xs);
    let (mut w8, mut w8s) = (vec![0i8; n * k], vec![0.0; n]);
    quantize_rows_i8(&w, n, k, &mut w8, &mut w8s);
    let w4s: Vec<f32> = w.chunks(g).map(|c| c.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 7.0).collect();
    let w4: Vec<i8> = w.iter().enumerate().map(|(i, v)| (v / w4s[i / g]).round().clamp(-8.0, 7.0) as i8).collect();
    let dequant =
        |q: &[i8], s: &dyn Fn(usize) -> f32| q.iter().enumerate().map(|(i, &v)| v as f32 * s(i)).collect::<Vec<_>>();
    let xd = dequant(&xq, &|i| xs[i / k]);
    let w8_product = matmul_xwt_reference(&xd, &dequant(&w8, &|i| w8s[i / k]), m, n, k);
    let w4_product = matmul_xwt_reference(&xd, &dequant(&w4, &|i| w4s[i / g]), m, n, k);
    // Asymmetric min/max in groups of 128, which do not divide k: 4 × 128 + 64 per row.
    let (ga, groups) = (128, k.div_ceil(128));
    let (mut wa, mut was, mut waz) = (Vec::new(), Vec::new(), Vec::new());
    for group in w.chunks(k).flat_map(|row| row.chunks(ga)) {
        let (lo, hi) = group.iter().fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let scale = (hi - lo) / 15.0;
        let zero = ((-lo / scale).round() - 8.0).clamp(-8.0, 7.0);
        wa.extend(group.iter().map(|v| ((v / scale).round() + zero).clamp(-8.0, 7.0) as i8));
        was.push(scale);
        waz.push(zero as i8);
    }
    let at = |i: usize| i / k * groups + i % k / ga;
    let wad: Vec<f32> = wa.iter().enumerate().map(|(i, &v)| was[at(i)] * (v - waz[at(i)]) as f32).collect();
    let wa_product = matmul_xwt_reference(&xd, &wad, m, n, k);
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    for kernel in kernels() {
        let mut got = vec![0.0; m * n];
        gemm_w8a8_with(kernel, &xq, &xs, &I8Weight::new(&w8, &w8s, n, k), None, &mut got, m, false);
        assert!(max_diff(&got, &w8_product) < 1e-5 * rms, "{kernel:?} W8A8 vs dequantized product");
        // Rounding errors of 8-bit x and w: about 0.5% of the output's rms, a few σ at most.
        assert!(max_diff(&got, &exact) < 0.03 * rms, "{kernel:?} W8A8 vs f32 product");
        gemm_w4a8_with(kernel, &xq, &xs, &I4Weight::new(&w4, &w4s, None, n, k, g), None, &mut got, m, false);
        assert!(max_diff(&got, &w4_product) < 1e-5 * rms, "{kernel:?} W4A8 vs dequantized product");
        // 4-bit steps of amax/7: about 7% of the rms.
        assert!(max_diff(&got, &exact) < 0.4 * rms, "{kernel:?} W4A8 vs f32 product");
        gemm_w4a8_with(kernel, &xq, &xs, &I4Weight::new(&wa, &was, Some(&waz), n, k, ga), None, &mut got, m, false);
        assert!(max_diff(&got, &wa_product) < 1e-5 * rms, "{kernel:?} asymmetric W4A8 vs dequantized product");
        assert!(max_diff(&got, &exact) < 0.4 * rms, "{kernel:?} asymmetric W4A8 vs f32 product");
    }
}
