//! Quantization methods: each stored form must compute exactly what its dequantized weight
//! computes, and names select methods or fail clearly.

use anyq_core::cpu::matmul_xwt_reference;
use anyq_core::testing::XorShift;
use anyq_quant::methods::{method_by_name, LayerToQuantize};
use anyq_quant::quantizer::{fake_quantize, Granularity, QuantSpec, ScaleSearch};

fn layer<'a>(w: &'a [f32], bias: Option<&'a [f32]>, n: usize, k: usize) -> LayerToQuantize<'a> {
    LayerToQuantize { weight: w, bias, out_features: n, in_features: k, input_stats: None }
}

#[test]
fn rtn_layers_compute_with_their_dequantized_weight() {
    let cases = [
        ("rtn-w8a16", QuantSpec::new(8, false, Granularity::PerChannel)),
        ("rtn-w4a16-g32", QuantSpec::new(4, false, Granularity::PerGroup(32))),
        // Rows of 64 and 128 end in a shorter group: 48 + 16, 2·48 + 32.
        ("rtn-w4a16-g48", QuantSpec::new(4, false, Granularity::PerGroup(48))),
        ("rtn-w3a16-g64", QuantSpec::new(3, false, Granularity::PerGroup(64))),
        ("rtn-w2a16-g32", QuantSpec::new(2, false, Granularity::PerGroup(32))),
        (
            "rtn-w2a16-g32-bb",
            QuantSpec {
                bits: 2,
                symmetric: true,
                bit_balance: true,
                granularity: Granularity::PerGroup(32),
                search: ScaleSearch::MinMax,
            },
        ),
    ];
    let mut rng = XorShift::new(7);
    for (name, spec) in cases {
        let method = method_by_name(name).unwrap();
        assert_eq!(method.name(), name);
        for (n, k) in [(37, 64), (5, 192), (130, 128)] {
            let w = rng.floats(n * k);
            let bias = rng.floats(n);
            let linear = method.quantize(&layer(&w, Some(&bias), n, k)).unwrap();
            let w_hat = fake_quantize(&w, n, k, &spec).unwrap();
            assert_eq!(linear.dense_weight(), w_hat, "{name}: stored form dequantizes to the quantizer's values");
            for m in [1, 3, 40] {
                let x = rng.floats(m * k);
                let mut out = vec![f32::NAN; m * n];
                linear.forward(&x, m, &mut out);
                let mut expected = matmul_xwt_reference(&x, &w_hat, m, n, k);
                for row in expected.chunks_exact_mut(n) {
                    row.iter_mut().zip(&bias).for_each(|(y, b)| *y += b);
                }
                for (a, b) in out.iter().zip(&expected) {
                    // f32 sums of k products of magnitude ≤ 1 against an f64 reference.
                    assert!((a - b).abs() <= 4.0 * k as f32 * f32::EPSILON, "{name} {n}x{k} m={m}: {a} vs {b}");
                }
            }
            // Fewer bits, fewer bytes: packed integers plus per-group scales and zero points.
            assert!(linear.weight_bytes() < 4 * n * k + 4 * n, "{name}: {} bytes", linear.weight_bytes());
        }
    }
}

#[test]
fn rtn_error_shrinks_with_bits_and_bit_balance_beats_plain_int2() {
    let (n, k) = (64, 256);
    let mut rng = XorShift::new(3);
    // Bell-shaped weights (sum of uniforms), as trained weights are.
    let w: Vec<f32> = (0..n * k).map(|_| (rng.uniform() + rng.uniform() + rng.uniform()) / 3.0).collect();
    let mse = |name: &str| {
        let linear = method_by_name(name).unwrap().quantize(&layer(&w, None, n, k)).unwrap();
        linear.dense_weight().iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / w.len() as f64
    };
    let errors: Vec<f64> =
        ["rtn-w2a16-g32", "rtn-w3a16-g32", "rtn-w4a16-g32", "rtn-w8a16-g32"].iter().map(|n| mse(n)).collect();
    assert!(errors.windows(2).all(|e| e[1] < e[0] / 3.0), "each extra bit cuts the error: {errors:?}");
    assert!(mse("rtn-w4a16-g32") < mse("rtn-w4a16"), "groups beat one scale per channel");
    assert!(mse("rtn-w2a16-g32-bb") < mse("rtn-w2a16-g32"), "5 symmetric levels beat 4 asymmetric ones");
}

#[test]
fn bad_method_names_and_shapes_are_errors() {
    for (name, expected) in [
        ("awq-w4", "unknown quantization method"),
        ("gptq-w4", "expected gptq-w"),
        ("mixq-w8a8-x2", "unknown option"),
        ("mixq-w8a8-c0", "outside (0, 100]"),
        ("rtn-w9a16", "bit width 9"),
        ("rtn-w4a8", "8-bit activations go with"),
        ("rtn-w4a4", "expected rtn-w"),
        ("rtn-w4a16-gx", "group size must be a number"),
        ("rtn-w4a16-g128-zz", "unknown option"),
        ("rtn-w4a16-bb", "bit"),
    ] {
        let e = method_by_name(name).err().unwrap_or_else(|| panic!("{name} was accepted")).to_string();
        assert!(e.contains(expected), "{name}: {e}");
    }
    // A group longer than the row is one shorter group; the int4 kernels take k in multiples of 8.
    let w = vec![0.5; 4 * 100];
    assert!(method_by_name("rtn-w4a16-g128").unwrap().quantize(&layer(&w, None, 4, 100)).is_ok());
    let e = method_by_name("rtn-w4a8-g128").unwrap().quantize(&layer(&w, None, 4, 100)).err().unwrap().to_string();
    assert!(e.contains("128") && e.contains("100"), "{e}");
}

/// `y = deq(q(x / s)) · (ŵ · s)ᵀ`: what an activation-quantized layer must compute from its
/// own effective weight (`dense_weight`, in x's space) and per-token int8 activations.
fn act_quant_reference(linear: &dyn anyq_core::Linear, x: &[f32], m: usize, smooth: Option<&[f32]>) -> Vec<f32> {
    use anyq_core::cpu::int8::quantize_rows_i8;
    let (n, k) = (linear.out_features(), linear.in_features());
    let ones = vec![1.0; k];
    let s = smooth.unwrap_or(&ones);
    let xs: Vec<f32> = x.chunks_exact(k).flat_map(|row| row.iter().zip(s).map(|(v, s)| v / s)).collect();
    let (mut q, mut scales) = (vec![0i8; m * k], vec![0.0f32; m]);
    quantize_rows_i8(&xs, m, k, &mut q, &mut scales);
    let x_hat: Vec<f32> = q.iter().enumerate().map(|(i, &v)| v as f32 * scales[i / k]).collect();
    let w_s: Vec<f32> =
        linear.dense_weight().chunks_exact(k).flat_map(|row| row.iter().zip(s).map(|(v, s)| v * s)).collect();
    let mut y = matmul_xwt_reference(&x_hat, &w_s, m, n, k);
    if let Some(b) = linear.bias() {
        y.chunks_exact_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    y
}

#[test]
fn activation_quantized_methods_compute_with_int8_activations() {
    use anyq_quant::calibration::ChannelStats;
    let mut rng = XorShift::new(11);
    let (n, k) = (70, 256);
    let w = rng.floats(n * k);
    let bias = rng.floats(n);
    // Activations with two outlier channels, as LLMs have.
    let m = 9;
    let x: Vec<f32> = rng
        .floats(m * k)
        .iter()
        .enumerate()
        .map(|(i, v)| if i % k == 3 || i % k == 77 { v * 40.0 } else { *v })
        .collect();
    let mut stats = ChannelStats::new(k);
    stats.update(&x);
    let dense = matmul_xwt_reference(&x, &w, m, n, k);
    let mut errors = Vec::new();
    // 256 = 5·48 + 16: a shorter last group.
    for name in ["rtn-w8a8", "rtn-w4a8-g32", "smoothquant-w8a8", "smoothquant-w8a8-a0.8", "rtn-w4a8-g48"] {
        let method = method_by_name(name).unwrap();
        assert_eq!(method.name(), name);
        let linear = method
            .quantize(&LayerToQuantize {
                weight: &w,
                bias: Some(&bias),
                out_features: n,
                in_features: k,
                input_stats: Some(&stats),
            })
            .unwrap();
        let smooth = name.starts_with("smoothquant").then(|| {
            let alpha = if name.ends_with("a0.8") { 0.8 } else { 0.5 };
            anyq_quant::methods::smoothquant::smoothing_factors(stats.abs_max(), &w, k, alpha)
        });
        let mut out = vec![f32::NAN; m * n];
        linear.forward(&x, m, &mut out);
        let expected = act_quant_reference(linear.as_ref(), &x, m, smooth.as_deref());
        let scale = expected.iter().fold(1.0f32, |a, v| a.max(v.abs()));
        for (a, b) in out.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-4 * scale, "{name}: {a} vs {b}");
        }
        let err: f64 =
            out.iter().zip(&dense).zip(&bias.repeat(m)).map(|((a, d), b)| ((a - d - b) as f64).powi(2)).sum();
        errors.push((name, err));
    }
    eprintln!("{errors:?}");
    // Smoothing moves the outliers into the weights: less error than plain per-token W8A8.
    assert!(errors[2].1 < errors[0].1, "{errors:?}");
    let e = method_by_name("smoothquant-w8a8")
        .unwrap()
        .quantize(&LayerToQuantize { weight: &w, bias: None, out_features: n, in_features: k, input_stats: None })
        .err()
        .unwrap();
    assert!(e.to_string().contains("needs calibration"), "{e}");
    for bad in ["rtn-w4a8", "rtn-w8a8-g32", "smoothquant-w8a8-a2", "smoothquant-w4a8"] {
        assert!(method_by_name(bad).is_err(), "{bad} accepted");
    }
}
