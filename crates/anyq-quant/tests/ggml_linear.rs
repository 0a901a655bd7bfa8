//! `GgmlLinear` against the product with its dequantized weight, on random blocks of every
//! type and odd shapes; construction errors; and an ignored benchmark against `DenseLinear`
//! (run with `cargo test --release -p anyq-quant -- --ignored --nocapture`).

use anyq_core::cpu::matmul_xwt_reference;
use anyq_core::Linear;
use anyq_quant::ggml::{GgmlError, GgmlType};
use anyq_quant::ggml_linear::GgmlLinear;
use half::{bf16, f16};

use anyq_core::testing::XorShift as Rng;

/// Every type, found through the id table.
fn all_types() -> Vec<GgmlType> {
    (0..=255).filter_map(GgmlType::from_id).collect()
}

/// Byte offsets of each type's scale fields within a block: (is f32, offset). As in the
/// fixtures script, every other byte of a block is random.
fn scale_fields(ty: GgmlType) -> &'static [(bool, usize)] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => &[(false, 0)],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[(false, 0), (false, 2)],
        Q2_K => &[(false, 80), (false, 82)],
        Q3_K => &[(false, 108)],
        Q6_K => &[(false, 208)],
        Q8_K => &[(true, 0)],
        F32 | F16 | BF16 => &[],
    }
}

/// Random weight bytes for `n_elements` of `ty`, every value finite: random blocks whose
/// scales are set to `scale`·[-1, 1), except that some blocks get a large scale (×100) and
/// some an f16 subnormal one; float types get values in `scale`·[-1, 1).
fn random_weight(ty: GgmlType, n_elements: usize, scale: f32, rng: &mut Rng) -> Vec<u8> {
    match ty {
        GgmlType::F32 => return rng.floats(n_elements).iter().flat_map(|v| (v * scale).to_le_bytes()).collect(),
        GgmlType::F16 => {
            return rng.floats(n_elements).iter().flat_map(|v| f16::from_f32(v * scale).to_le_bytes()).collect()
        }
        GgmlType::BF16 => {
            return rng.floats(n_elements).iter().flat_map(|v| bf16::from_f32(v * scale).to_le_bytes()).collect()
        }
        _ => {}
    }
    let mut bytes: Vec<u8> = (0..ty.bytes_for(n_elements).unwrap()).map(|_| rng.next_u64() as u8).collect();
    for (i, block) in bytes.chunks_exact_mut(ty.type_size()).enumerate() {
        for &(is_f32, offset) in scale_fields(ty) {
            let mut v = scale * rng.uniform();
            if i % 13 == 7 {
                v *= 100.0;
            }
            let h = if i % 11 == 5 { f16::from_bits((rng.next_u64() as u16 & 0x83FF) | 1) } else { f16::from_f32(v) };
            if is_f32 {
                block[offset..offset + 4].copy_from_slice(&h.to_f32().to_le_bytes());
            } else {
                block[offset..offset + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
    }
    bytes
}

fn dequantized(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Vec<f32> {
    let mut w = vec![0.0; n_elements];
    ty.dequantize(bytes, &mut w).unwrap();
    w
}

/// The plain product: dequantize the whole weight, then the f64-accumulated triple loop.
fn reference(ty: GgmlType, bytes: &[u8], bias: Option<&[f32]>, x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let w = dequantized(ty, bytes, n * k);
    let mut y = matmul_xwt_reference(x, &w, m, n, k);
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(n) {
            for (v, b) in row.iter_mut().zip(b) {
                *v += b;
            }
        }
    }
    y
}

/// Max |Δ| ≤ 1e-5 · max(1, max |y_ref|). Both sides multiply the same f32 weights and
/// activations and differ only in summation order (the reference sums exactly in f64); the
/// kernels sum in at least eight independent lanes, so the f32 rounding error grows like
/// √k·ε·|y|, far below this bound for the k tested here (≤ 1536), while a wrong element,
/// block or row moves the result by the size of a term.
fn assert_close(what: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths");
    let scale = expected.iter().fold(1.0f32, |a, v| a.max(v.abs()));
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            g.is_finite() && (g - e).abs() <= 1e-5 * scale,
            "{what}: element {i}: got {g}, expected {e} (scale {scale})"
        );
    }
}

fn check(ty: GgmlType, ms: &[usize], ns: &[usize], ks: &[usize]) {
    let mut rng = Rng::new(ty.id() as u64 + 1);
    for &k in ks {
        for &n in ns {
            let bytes = random_weight(ty, n * k, 2.0, &mut rng);
            let bias = (n % 2 == 1).then(|| rng.floats(n));
            let linear = GgmlLinear::new(ty, bytes.clone(), bias.clone(), n, k).unwrap();
            assert_eq!((linear.out_features(), linear.in_features()), (n, k));
            for &m in ms {
                let x = rng.floats(m * k);
                let mut out = vec![f32::NAN; m * n];
                linear.forward(&x, m, &mut out);
                let expected = reference(ty, &bytes, bias.as_deref(), &x, m, n, k);
                assert_close(&format!("{ty} m={m} n={n} k={k}"), &out, &expected);
            }
        }
    }
}

#[test]
fn fast_types_match_reference_on_odd_shapes() {
    for ty in all_types().into_iter().filter(|&t| GgmlLinear::supports(t)) {
        check(ty, &[1, 2, 3, 4, 5, 7, 20, 21, 64, 130], &[1, 37, 1000], &[32, 96, 256, 576]);
    }
}

/// Quantizes `w` (a multiple of 32 values) as llama.cpp's reference quantizers do, near enough
/// to give realistic blocks: zero-mean weights, with Q4_1's offset near −8 steps.
fn quantize(ty: GgmlType, w: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in w.chunks_exact(32) {
        let f16_bytes = |v: f32| f16::from_f32(v).to_le_bytes();
        match ty {
            GgmlType::Q8_0 => {
                let d = b.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend(f16_bytes(d));
                out.extend(b.iter().map(|v| (v * inv).round() as i8 as u8));
            }
            GgmlType::Q4_0 => {
                let max = b.iter().fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend(f16_bytes(d));
                let q = |v: f32| ((v * inv + 8.5) as u8).min(15);
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
            GgmlType::Q4_1 => {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend(f16_bytes(d));
                out.extend(f16_bytes(min));
                let q = |v: f32| (((v - min) * inv + 0.5) as u8).min(15);
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
            _ => unreachable!("no test quantizer for {ty}"),
        }
    }
    out
}

/// Realistic blocks against activations that are all positive, so that each block's terms
/// add up far beyond the result: the case where any reassociation that cancels large partial
/// sums (such as factoring Q4_1's offset out of a block's sum) would lose precision.
#[test]
fn fast_types_match_reference_on_quantized_weights_and_positive_inputs() {
    let mut rng = Rng::new(17);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for &(m, n, k) in &[(1, 1000, 576), (1, 37, 1536), (7, 300, 1536), (64, 37, 576)] {
            let w: Vec<f32> = rng.floats(n * k).iter().map(|v| 0.05 * v).collect();
            let bytes = quantize(ty, &w);
            let x: Vec<f32> = rng.floats(m * k).iter().map(|v| 4.0 + 3.0 * v).collect();
            let linear = GgmlLinear::new(ty, bytes.clone(), None, n, k).unwrap();
            let mut out = vec![f32::NAN; m * n];
            linear.forward(&x, m, &mut out);
            assert_close(&format!("{ty} m={m} n={n} k={k}"), &out, &reference(ty, &bytes, None, &x, m, n, k));
        }
    }
}

#[test]
fn other_types_match_reference() {
    for ty in all_types().into_iter().filter(|&t| !GgmlLinear::supports(t)) {
        let ks: &[usize] = match ty.block_size() {
            1 => &[1, 37, 576, 1100],
            32 => &[32, 96, 576, 1088],
            _ => &[256, 512, 1536],
        };
        check(ty, &[1, 2, 7, 130], &[1, 37, 300], ks);
    }
}

#[test]
fn supported_types() {
    let fast: Vec<GgmlType> = all_types().into_iter().filter(|&t| GgmlLinear::supports(t)).collect();
    assert_eq!(fast, [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0]);
}

#[test]
fn dequantize_row_is_the_row_of_the_dequantized_weight() {
    let mut rng = Rng::new(5);
    for ty in all_types() {
        let (n, k) = (5, 2 * ty.block_size().max(32));
        let bytes = random_weight(ty, n * k, 1.0, &mut rng);
        let whole = dequantized(ty, &bytes, n * k);
        let linear = GgmlLinear::new(ty, bytes, None, n, k).unwrap();
        let mut row = vec![f32::NAN; k];
        for r in 0..n {
            linear.dequantize_row(r, &mut row);
            let same = row.iter().zip(&whole[r * k..(r + 1) * k]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ty} row {r}");
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (ty, n, k) = (GgmlType::Q4_1, 1000, 576);
    let mut rng = Rng::new(9);
    let bytes = random_weight(ty, n * k, 1.0, &mut rng);
    let linear = GgmlLinear::new(ty, bytes.clone(), None, n, k).unwrap();
    for m in [1, 7, 64] {
        let x = rng.floats(m * k);
        let expected = reference(ty, &bytes, None, &x, m, n, k);
        let mut first: Option<Vec<f32>> = None;
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut out = vec![f32::NAN; m * n];
            pool.install(|| linear.forward(&x, m, &mut out));
            assert_close(&format!("m={m} threads={threads}"), &out, &expected);
            // For a few rows of x each output is one row's sum however rows of W are split;
            // prefill panels may differ in the last bits.
            if m < 64 {
                match &first {
                    None => first = Some(out),
                    Some(f) => {
                        let same = f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "m={m} threads={threads}");
                    }
                }
            }
        }
    }
}

#[test]
fn empty_and_degenerate_shapes() {
    let linear = GgmlLinear::new(GgmlType::Q8_0, Vec::new(), None, 0, 64).unwrap();
    linear.forward(&[0.0; 128], 2, &mut []);
    let linear = GgmlLinear::new(GgmlType::Q8_0, Vec::new(), Some(vec![1.5, -2.0]), 2, 0).unwrap();
    let mut out = [f32::NAN; 6];
    linear.forward(&[], 3, &mut out);
    assert_eq!(out, [1.5, -2.0, 1.5, -2.0, 1.5, -2.0]);
    let linear = GgmlLinear::new(GgmlType::Q4_1, vec![0; 40], None, 1, 64).unwrap();
    linear.forward(&[], 0, &mut []);
}

#[test]
fn weight_bytes_are_the_stored_bytes() {
    let linear = GgmlLinear::new(GgmlType::Q4_1, vec![0; 3 * 40], None, 3, 64).unwrap();
    assert_eq!(linear.weight_bytes(), 120);
    let linear = GgmlLinear::new(GgmlType::Q4_1, vec![0; 3 * 40], Some(vec![0.0; 3]), 3, 64).unwrap();
    assert_eq!(linear.weight_bytes(), 120 + 12);
    assert_eq!(linear.ggml_type(), GgmlType::Q4_1);
    assert_eq!(linear.bytes().len(), 120);
}

#[test]
fn construction_errors() {
    use GgmlType::*;
    assert_eq!(
        GgmlLinear::new(Q4_1, vec![0; 40], None, 1, 33).unwrap_err(),
        GgmlError::NotBlockMultiple { ty: Q4_1, n_elements: 33, block_size: 32 }
    );
    assert_eq!(
        GgmlLinear::new(Q4_K, vec![0; 144 * 3], None, 1, 576).unwrap_err(),
        GgmlError::NotBlockMultiple { ty: Q4_K, n_elements: 576, block_size: 256 }
    );
    assert_eq!(
        GgmlLinear::new(Q8_0, vec![0; 2 * 68 - 1], None, 2, 64).unwrap_err(),
        GgmlError::LengthMismatch { ty: Q8_0, n_elements: 128, expected: 136, got: 135 }
    );
    assert_eq!(
        GgmlLinear::new(Q8_0, vec![0; 2 * 68 + 34], None, 2, 64).unwrap_err(),
        GgmlError::LengthMismatch { ty: Q8_0, n_elements: 128, expected: 136, got: 170 }
    );
    // A bias of the wrong length is reported as an F32 tensor of out_features values.
    assert_eq!(
        GgmlLinear::new(Q8_0, vec![0; 2 * 68], Some(vec![0.0; 3]), 2, 64).unwrap_err(),
        GgmlError::LengthMismatch { ty: F32, n_elements: 2, expected: 8, got: 12 }
    );
    assert!(matches!(GgmlLinear::new(F32, Vec::new(), None, usize::MAX, 2), Err(GgmlError::TooLarge { .. })));
}

#[test]
#[should_panic(expected = "row 3 of 3")]
fn dequantize_row_out_of_range_panics() {
    let linear = GgmlLinear::new(GgmlType::Q8_0, vec![0; 3 * 34], None, 3, 32).unwrap();
    linear.dequantize_row(3, &mut [0.0; 32]);
}
