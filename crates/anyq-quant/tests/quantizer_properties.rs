//! Properties of the quantizer and of sub-byte packing, on fresh random matrices for every bit
//! width, symmetric and asymmetric, bit-balanced INT2 and each granularity (groups that divide
//! the columns and groups that leave a shorter last group in each row); and every error case.

use std::ops::Range;

use anyq_core::testing::XorShift;
use anyq_quant::packing::{self, PackError};
use anyq_quant::quantizer::{
    fake_quantize, quantize, Granularity, GroupParams, QuantError, QuantSpec, QuantizedMatrix, ScaleSearch,
};
use proptest::prelude::*;

const MSE: ScaleSearch = ScaleSearch::Mse { steps: 20, min_ratio: 0.5 };

/// Bits 2..=8 symmetric and asymmetric, and bit-balanced INT2, at each granularity.
fn all_specs(group_size: usize, search: ScaleSearch) -> Vec<QuantSpec> {
    let mut specs = Vec::new();
    for granularity in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(group_size)] {
        for bits in 2..=8 {
            for symmetric in [true, false] {
                specs.push(QuantSpec { search, ..QuantSpec::new(bits, symmetric, granularity) });
            }
        }
        specs.push(QuantSpec { bit_balance: true, search, ..QuantSpec::new(2, true, granularity) });
    }
    specs
}

/// The elements of each group, in order, as the module documents the layout: per group, runs
/// of `g` along each row, the last one shorter when `g` does not divide the columns.
fn group_ranges(spec: &QuantSpec, rows: usize, cols: usize) -> Vec<Range<usize>> {
    match spec.granularity {
        Granularity::PerTensor => std::iter::once(0..rows * cols).collect(),
        Granularity::PerChannel => (0..rows).map(|r| r * cols..(r + 1) * cols).collect(),
        Granularity::PerGroup(g) => (0..rows)
            .flat_map(|r| (0..cols).step_by(g).map(move |c| r * cols + c..r * cols + (c + g).min(cols)))
            .collect(),
    }
}

/// The group of each element, from `group_ranges`.
fn group_of_each(ranges: &[Range<usize>]) -> Vec<usize> {
    ranges.iter().enumerate().flat_map(|(g, r)| r.clone().map(move |_| g)).collect()
}

fn gaussian(rng: &mut XorShift) -> f32 {
    let u1 = ((rng.next_u64() >> 40) + 1) as f32 / (1u64 << 24) as f32;
    let u2 = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Σ (a − b)², accumulated as the quantizer's search does.
fn squared_error(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let diff = (x - y) as f64;
            diff * diff
        })
        .sum()
}

#[derive(Clone, Debug)]
struct Matrix {
    rows: usize,
    cols: usize,
    group_size: usize,
    data: Vec<f32>,
}

/// A random matrix whose rows are split into groups of `group_size`, half of the time followed
/// by a shorter group (1 to `group_size − 1` elements, then sometimes the whole row); each group
/// is drawn from one of: zeros, a constant, uniform, all positive, Gaussian, or subnormal-small
/// values, at a random magnitude.
fn matrix() -> impl Strategy<Value = Matrix> {
    let group_sizes = prop::sample::select(vec![1usize, 2, 3, 7, 32, 64, 128]);
    (1usize..5, 0usize..4, group_sizes, any::<bool>(), -12i32..12, any::<u64>(), any::<bool>()).prop_map(
        |(rows, full_groups, group_size, ragged, magnitude_exp, seed, mixed)| {
            let mut rng = XorShift::new(seed);
            let tail = match (ragged || full_groups == 0) && group_size > 1 {
                true => 1 + (rng.next_u64() % (group_size as u64 - 1)) as usize,
                false => 0,
            };
            let full_groups = if full_groups == 0 && tail == 0 { 1 } else { full_groups };
            let cols = full_groups * group_size + tail;
            let magnitude = 2f32.powi(magnitude_exp);
            let mut data = Vec::with_capacity(rows * cols);
            let group_lens = std::iter::repeat_n(group_size, full_groups).chain((tail > 0).then_some(tail));
            for len in (0..rows).flat_map(|_| group_lens.clone()) {
                let kind = if mixed { rng.next_u64() % 6 } else { 2 };
                let constant = rng.uniform() * magnitude;
                for _ in 0..len {
                    data.push(match kind {
                        0 => 0.0,
                        1 => constant,
                        2 => rng.uniform() * magnitude,
                        3 => (rng.uniform() + 2.0) * magnitude,
                        4 => gaussian(&mut rng) * magnitude,
                        _ => rng.uniform() * 1e-39,
                    });
                }
            }
            Matrix { rows, cols, group_size, data }
        },
    )
}

/// The largest error round-to-nearest may make at scale `s` on `x`: half a step, plus the
/// rounding of `x / s` (relative 2^-24 of at most 255 steps), of `s · q`, and the few ulps an
/// asymmetric scale may be nudged down by (4 · 255 · 2^-23 of a step).
fn half_step_bound(x: f32, scale: f32) -> f32 {
    scale * (0.5 + 2.5e-4) + x.abs() * 1e-6 + 1e-44
}

fn check_ranges(q: &QuantizedMatrix, groups: usize) {
    let spec = &q.spec;
    assert_eq!(q.values.len(), q.rows * q.cols);
    assert_eq!(q.scales.len(), groups);
    for &v in &q.values {
        assert!((spec.qmin()..=spec.qmax()).contains(&(v as i32)), "{v} outside [{}, {}]", spec.qmin(), spec.qmax());
    }
    for &s in &q.scales {
        assert!(s.is_normal() && s > 0.0, "scale {s}");
    }
    if spec.symmetric {
        assert!(q.zeros.is_empty());
    } else {
        assert_eq!(q.zeros.len(), groups);
        assert!(q.zeros.iter().all(|z| (spec.qmin()..=spec.qmax()).contains(z)));
    }
}

proptest! {
    // Failures print their minimal input; a regression file would land in the source tree.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// (1) values and zero points within range; `fake_quantize` is `dequantize ∘ quantize`, and
    /// the dequantized values follow `scale_of` and `zero_of`; the values pack into
    /// `storage_bits` and come back.
    #[test]
    fn values_stay_in_range_and_views_agree(m in matrix()) {
        for search in [ScaleSearch::MinMax, MSE] {
            for spec in all_specs(m.group_size, search) {
                let q = quantize(&m.data, m.rows, m.cols, &spec).unwrap();
                let ranges = group_ranges(&spec, m.rows, m.cols);
                let group_of = group_of_each(&ranges);
                check_ranges(&q, ranges.len());
                let dq = q.dequantize();
                let fq = fake_quantize(&m.data, m.rows, m.cols, &spec).unwrap();
                prop_assert_eq!(dq.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    fq.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                for (i, &v) in dq.iter().enumerate() {
                    let (row, col) = (i / m.cols, i % m.cols);
                    let expected = q.scale_of(row, col) * (q.values[i] as i32 - q.zero_of(row, col)) as f32;
                    prop_assert_eq!(v, expected);
                    prop_assert_eq!(q.scale_of(row, col), q.scales[group_of[i]]);
                }
                let packed = packing::pack(&q.values, spec.storage_bits()).unwrap();
                prop_assert_eq!(packing::unpack(&packed, spec.storage_bits(), q.values.len()).unwrap(), q.values.clone());
            }
        }
    }

    /// (2) Round to nearest: with min/max scales every element is within half a step of its
    /// dequantized value; with clipping, every element inside the clipped range is.
    #[test]
    fn error_is_at_most_half_a_step(m in matrix()) {
        for search in [ScaleSearch::MinMax, MSE] {
            for spec in all_specs(m.group_size, search) {
                let q = quantize(&m.data, m.rows, m.cols, &spec).unwrap();
                let dq = q.dequantize();
                for (i, (&x, &y)) in m.data.iter().zip(&dq).enumerate() {
                    let (row, col) = (i / m.cols, i % m.cols);
                    let (s, z) = (q.scale_of(row, col), q.zero_of(row, col));
                    let inside = (s * (spec.qmin() - z) as f32..=s * (spec.qmax() - z) as f32).contains(&x);
                    if search == ScaleSearch::MinMax || inside {
                        prop_assert!((x - y).abs() <= half_step_bound(x, s),
                            "{spec:?}: x = {x}, x̂ = {y}, scale {s} at ({row}, {col})");
                    }
                }
            }
        }
    }

    /// (3) Quantizing dequantized values gives the same integers and zero points again; and on
    /// one group's own grid, every grid point quantizes back to itself exactly.
    #[test]
    fn dequantized_values_are_a_fixed_point(m in matrix()) {
        for spec in all_specs(m.group_size, ScaleSearch::MinMax) {
            let first = quantize(&m.data, m.rows, m.cols, &spec).unwrap();
            let dq = first.dequantize();
            let again = quantize(&dq, m.rows, m.cols, &spec).unwrap();
            prop_assert_eq!(&again.values, &first.values, "{:?}", spec);
            prop_assert_eq!(&again.zeros, &first.zeros);
            let ranges = group_ranges(&spec, m.rows, m.cols);
            for ((a, b), group) in again.scales.iter().zip(&first.scales).zip(ranges.iter().map(|r| &dq[r.clone()])) {
                // A group that rounded to all zeros has nothing left to fix its scale.
                if group.iter().any(|&v| v != 0.0) {
                    prop_assert!((a - b).abs() <= b * 1e-6, "scale {} became {}", b, a);
                }
            }
            for (&a, &b) in again.dequantize().iter().zip(&dq) {
                prop_assert!((a - b).abs() <= b.abs() * 1e-6 + 1e-44);
            }
            for (g, &scale) in first.scales.iter().enumerate() {
                let params = GroupParams { scale, zero: first.zeros.get(g).copied().unwrap_or(0) };
                for code in spec.qmin()..=spec.qmax() {
                    let x = params.dequantize(code as i8);
                    prop_assert_eq!(spec.quantize_value(x, params) as i32, code);
                }
            }
        }
    }

    /// (4) The clip search never does worse than min/max on any group.
    #[test]
    fn mse_search_never_loses_to_min_max(m in matrix(), steps in 1usize..40, min_ratio in 0.05f32..=1.0) {
        let search = ScaleSearch::Mse { steps, min_ratio };
        for (searched, plain) in all_specs(m.group_size, search).iter().zip(all_specs(m.group_size, ScaleSearch::MinMax)) {
            let with_search = fake_quantize(&m.data, m.rows, m.cols, searched).unwrap();
            let with_min_max = fake_quantize(&m.data, m.rows, m.cols, &plain).unwrap();
            for r in group_ranges(searched, m.rows, m.cols) {
                let x = &m.data[r.clone()];
                let searched_error = squared_error(x, &with_search[r.clone()]);
                let min_max_error = squared_error(x, &with_min_max[r]);
                prop_assert!(searched_error <= min_max_error * (1.0 + 1e-9),
                    "{searched:?}: {searched_error} > {min_max_error}");
            }
        }
    }

    /// (5) Bit-balanced INT2 beats plain symmetric INT2 ({−1, 0, 1}) on Gaussian data and uses
    /// exactly the 5 levels. The second half of the rows negates the first, so that both tails
    /// reach the extreme levels even when one outlier sets a per-tensor scale.
    #[test]
    fn bit_balance_beats_ternary_on_gaussian_data(seed in any::<u64>(), group_size in prop::sample::select(vec![32usize, 64, 128])) {
        let (rows, cols) = (64, 128);
        let mut rng = XorShift::new(seed);
        let mut x: Vec<f32> = (0..rows / 2 * cols).map(|_| gaussian(&mut rng)).collect();
        x.extend(x.clone().iter().map(|v| -v));
        for granularity in [Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup(group_size)] {
            for search in [ScaleSearch::MinMax, MSE] {
                let ternary = QuantSpec { search, ..QuantSpec::new(2, true, granularity) };
                let balanced = QuantSpec { bit_balance: true, ..ternary };
                prop_assert_eq!((balanced.levels(), balanced.storage_bits()), (5, 3));
                prop_assert_eq!((ternary.levels(), ternary.storage_bits()), (3, 2));
                let balanced_q = quantize(&x, rows, cols, &balanced).unwrap();
                let mut used: Vec<i8> = balanced_q.values.clone();
                used.sort_unstable();
                used.dedup();
                prop_assert_eq!(used, vec![-2, -1, 0, 1, 2]);
                let balanced_error = squared_error(&x, &balanced_q.dequantize());
                let ternary_error = squared_error(&x, &fake_quantize(&x, rows, cols, &ternary).unwrap());
                prop_assert!(balanced_error < ternary_error, "{granularity:?} {search:?}: {balanced_error} >= {ternary_error}");
            }
        }
    }

    /// (6) Packing round trips for every width and length, in ⌈n · bits / 8⌉ bytes.
    #[test]
    fn pack_round_trips(bits in 1u8..=8, n in 0usize..200, seed in any::<u64>()) {
        let mut rng = XorShift::new(seed);
        let unsigned: Vec<u8> = (0..n).map(|_| (rng.next_u64() % (1 << bits)) as u8).collect();
        let signed: Vec<i8> = unsigned.iter().map(|&u| (u as i16 - (1 << (bits - 1))) as i8).collect();
        let needed = (n * bits as usize).div_ceil(8);
        prop_assert_eq!(packing::packed_len(n, bits), needed);

        let packed = packing::pack(&signed, bits).unwrap();
        prop_assert_eq!(packed.len(), needed);
        prop_assert_eq!(&packing::unpack(&packed, bits, n).unwrap(), &signed);
        let packed = packing::pack_unsigned(&unsigned, bits).unwrap();
        prop_assert_eq!(packed.len(), needed);
        prop_assert_eq!(&packing::unpack_unsigned(&packed, bits, n).unwrap(), &unsigned);

        // Trailing bytes are ignored; a missing one is an error.
        let mut longer = packed.clone();
        longer.push(0xFF);
        prop_assert_eq!(&packing::unpack_unsigned(&longer, bits, n).unwrap(), &unsigned);
        if needed > 0 {
            let short = packing::unpack_unsigned(&packed[..needed - 1], bits, n);
            prop_assert_eq!(short, Err(PackError::ShortBuffer { n, bits, needed, got: needed - 1 }));
        }
    }

    /// (7) A group's parameters depend on its own values only: changing one group changes no
    /// other group's scale, zero point or values.
    #[test]
    fn groups_are_independent(m in matrix(), pick in any::<u64>(), seed in any::<u64>()) {
        let mut rng = XorShift::new(seed);
        for search in [ScaleSearch::MinMax, MSE] {
            for spec in all_specs(m.group_size, search) {
                if spec.granularity == Granularity::PerTensor {
                    continue;
                }
                // A shorter last group is a group like the others (picked as often, when it is there).
                let ranges = group_ranges(&spec, m.rows, m.cols);
                let changed_group = (pick % ranges.len() as u64) as usize;
                let mut changed = m.data.clone();
                for x in &mut changed[ranges[changed_group].clone()] {
                    *x = rng.uniform() * 100.0 + 7.0;
                }
                let before = quantize(&m.data, m.rows, m.cols, &spec).unwrap();
                let after = quantize(&changed, m.rows, m.cols, &spec).unwrap();
                for (g, r) in ranges.iter().enumerate().filter(|&(g, _)| g != changed_group) {
                    prop_assert_eq!(before.scales[g], after.scales[g]);
                    prop_assert_eq!(before.zeros.get(g), after.zeros.get(g));
                    prop_assert_eq!(&before.values[r.clone()], &after.values[r.clone()]);
                }
            }
        }
    }
    /// (8) Each group is quantized on its own, a shorter last group too: its parameters are
    /// `group_params` of its elements and its values are theirs quantized with them.
    #[test]
    fn each_group_is_quantized_alone(m in matrix()) {
        for search in [ScaleSearch::MinMax, MSE] {
            for spec in all_specs(m.group_size, search) {
                let q = quantize(&m.data, m.rows, m.cols, &spec).unwrap();
                for (g, r) in group_ranges(&spec, m.rows, m.cols).into_iter().enumerate() {
                    let params = spec.group_params(&m.data[r.clone()]).unwrap();
                    let zero = q.zeros.get(g).copied().unwrap_or(0);
                    prop_assert_eq!(params, GroupParams { scale: q.scales[g], zero });
                    let values: Vec<i8> = m.data[r.clone()].iter().map(|&x| spec.quantize_value(x, params)).collect();
                    prop_assert_eq!(&q.values[r], &values[..]);
                }
            }
        }
    }
}

#[test]
fn ranges_levels_and_storage() {
    let cases = [
        // (bits, symmetric, bit_balance) → (qmin, qmax, levels, storage bits, unsigned offset)
        ((8, true, false), (-127, 127, 255, 8, 0)),
        ((8, false, false), (-128, 127, 256, 8, 128)),
        ((4, true, false), (-7, 7, 15, 4, 0)),
        ((4, false, false), (-8, 7, 16, 4, 8)),
        ((3, true, false), (-3, 3, 7, 3, 0)),
        ((2, true, false), (-1, 1, 3, 2, 0)),
        ((2, false, false), (-2, 1, 4, 2, 2)),
        ((2, true, true), (-2, 2, 5, 3, 0)),
    ];
    for ((bits, symmetric, bit_balance), expected) in cases {
        let spec = QuantSpec { bit_balance, ..QuantSpec::new(bits, symmetric, Granularity::PerChannel) };
        let got = (spec.qmin(), spec.qmax(), spec.levels(), spec.storage_bits(), spec.unsigned_offset());
        assert_eq!(got, expected, "{spec:?}");
    }
}

#[test]
fn known_values() {
    // Symmetric INT4 per channel: scale = max|x| / 7.
    let x = [7.0, -3.5, 1.0, 0.0, 14.0, -14.0, 5.0, 3.0];
    let q = quantize(&x, 2, 4, &QuantSpec::new(4, true, Granularity::PerChannel)).unwrap();
    assert_eq!(q.values, [7, -4, 1, 0, 7, -7, 2, 2]); // ties round to even
    assert_eq!(q.scales, [1.0, 2.0]);
    // Asymmetric INT4 per tensor over [-1, 2]: scale 0.2, unsigned zero point 5 (stored 5 - 8).
    let spec = QuantSpec::new(4, false, Granularity::PerTensor);
    let q = quantize(&[-1.0, 0.0, 2.0, 0.6], 1, 4, &spec).unwrap();
    assert_eq!((q.scales[0], q.zeros[0] + spec.unsigned_offset()), (0.2, 5));
    let unsigned: Vec<i32> = q.values.iter().map(|&v| v as i32 + spec.unsigned_offset()).collect();
    assert_eq!(unsigned, [0, 5, 15, 8]);
    // Symmetric INT4 in groups of 3 along rows of 5: groups of 3 and 2 in each row.
    let x = [7.0, -3.5, 1.0, 14.0, -7.0, 0.5, 0.0, -3.5, 7.0, -1.0];
    let q = quantize(&x, 2, 5, &QuantSpec::new(4, true, Granularity::PerGroup(3))).unwrap();
    assert_eq!(q.scales, [1.0, 2.0, 0.5, 1.0]);
    assert_eq!(q.values, [7, -4, 1, 7, -4, 1, 0, -7, 7, -1]);
    assert_eq!((q.scale_of(0, 2), q.scale_of(0, 3), q.scale_of(1, 2), q.scale_of(1, 4)), (1.0, 2.0, 0.5, 1.0));
}

#[test]
fn degenerate_matrices_give_finite_results() {
    let huge = [1e38, -1e38, 3e37, -5e37];
    for spec in all_specs(2, MSE).into_iter().chain(all_specs(2, ScaleSearch::MinMax)) {
        let zeros = quantize(&[0.0; 8], 2, 4, &spec).unwrap();
        assert!(zeros.dequantize().iter().all(|&v| v == 0.0), "{spec:?}");
        assert!(zeros.scales.iter().all(|&s| s == 1.0));
        for constant in [3.5, -0.25] {
            let fq = fake_quantize(&[constant; 8], 2, 4, &spec).unwrap();
            assert!(fq.iter().all(|&v| (v - constant).abs() <= constant.abs() * 1e-6), "{spec:?}: {fq:?}");
        }
        let fq = fake_quantize(&huge, 1, 4, &spec).unwrap();
        assert!(fq.iter().all(|v| v.is_finite()), "{spec:?}: {fq:?}");
        for (rows, cols) in [(0, 4), (3, 0), (0, 0)] {
            let q = quantize(&[], rows, cols, &spec).unwrap();
            assert!(q.values.is_empty() && q.dequantize().is_empty());
        }
    }
}

#[test]
fn spec_errors() {
    let base = QuantSpec::new(4, true, Granularity::PerGroup(32));
    let cases = [
        (QuantSpec { bits: 0, ..base }, QuantError::InvalidBits { bits: 0 }),
        (QuantSpec { bits: 1, ..base }, QuantError::InvalidBits { bits: 1 }),
        (QuantSpec { bits: 9, ..base }, QuantError::InvalidBits { bits: 9 }),
        (
            QuantSpec { bit_balance: true, ..base },
            QuantError::BitBalanceNeedsSymmetricInt2 { bits: 4, symmetric: true },
        ),
        (
            QuantSpec { bits: 2, symmetric: false, bit_balance: true, ..base },
            QuantError::BitBalanceNeedsSymmetricInt2 { bits: 2, symmetric: false },
        ),
        (QuantSpec { granularity: Granularity::PerGroup(0), ..base }, QuantError::ZeroGroupSize),
        (QuantSpec { search: ScaleSearch::Mse { steps: 0, min_ratio: 0.5 }, ..base }, QuantError::ZeroSearchSteps),
        (
            QuantSpec { search: ScaleSearch::Mse { steps: 10, min_ratio: 0.0 }, ..base },
            QuantError::InvalidMinRatio { min_ratio: 0.0 },
        ),
        (
            QuantSpec { search: ScaleSearch::Mse { steps: 10, min_ratio: 1.5 }, ..base },
            QuantError::InvalidMinRatio { min_ratio: 1.5 },
        ),
    ];
    let x = vec![0.5; 2 * 64];
    for (spec, error) in cases {
        assert_eq!(spec.validate(), Err(error.clone()), "{spec:?}");
        assert_eq!(quantize(&x, 2, 64, &spec).unwrap_err(), error);
        assert_eq!(fake_quantize(&x, 2, 64, &spec).unwrap_err(), error);
    }
    let nan_ratio = QuantSpec { search: ScaleSearch::Mse { steps: 10, min_ratio: f32::NAN }, ..base };
    assert!(matches!(nan_ratio.validate(), Err(QuantError::InvalidMinRatio { min_ratio }) if min_ratio.is_nan()));
    assert!(matches!(nan_ratio.group_params(&[1.0]), Err(QuantError::InvalidMinRatio { .. })));
    assert_eq!(base.validate(), Ok(()));
    // Groups need not divide the columns: 64 = 48 + 16.
    let ragged = QuantSpec { granularity: Granularity::PerGroup(48), ..base };
    assert_eq!(ragged.validate(), Ok(()));
    assert_eq!(quantize(&x, 2, 64, &ragged).unwrap().scales.len(), 4);
}

#[test]
fn input_errors() {
    let spec = QuantSpec::new(8, false, Granularity::PerChannel);
    assert_eq!(quantize(&[0.0; 5], 2, 3, &spec).unwrap_err(), QuantError::ShapeMismatch { rows: 2, cols: 3, len: 5 });
    assert_eq!(
        quantize(&[0.0; 4], usize::MAX, 2, &spec).unwrap_err(),
        QuantError::ShapeMismatch { rows: usize::MAX, cols: 2, len: 4 }
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![1.0; 12];
        x[4 + 2] = bad;
        for result in [quantize(&x, 3, 4, &spec).map(|_| ()), fake_quantize(&x, 3, 4, &spec).map(|_| ())] {
            match result {
                Err(QuantError::NonFinite { row: 1, col: 2, value }) => {
                    assert!(value.to_bits() == bad.to_bits())
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(spec.group_params(&[0.0, bad]), Err(QuantError::NonFinite { row: 0, col: 1, .. })));
    }
}

#[test]
fn group_params_match_quantize() {
    let mut rng = XorShift::new(7);
    // Rows of 60 = 3 × 16 + 12.
    let x = rng.floats(3 * 60);
    for spec in all_specs(16, MSE) {
        let q = quantize(&x, 3, 60, &spec).unwrap();
        for (g, r) in group_ranges(&spec, 3, 60).into_iter().enumerate() {
            let params = spec.group_params(&x[r]).unwrap();
            assert_eq!(params.scale, q.scales[g]);
            assert_eq!(params.zero, q.zeros.get(g).copied().unwrap_or(0));
        }
    }
}

#[test]
fn packing_layout_and_errors() {
    // Least significant bits first: 1, 2, 3 as 3 bits are 0b011_010_001 across two bytes.
    assert_eq!(packing::pack_unsigned(&[1, 2, 3], 3).unwrap(), [0b1101_0001, 0b0000_0000]);
    assert_eq!(packing::pack_unsigned(&[1, 2, 15], 4).unwrap(), [0x21, 0x0F]);
    assert_eq!(packing::pack(&[-1, 1, -4], 3).unwrap(), [0b0000_1111, 0b0000_0001]);
    assert_eq!(packing::unpack(&[0b0000_1111, 0b0000_0001], 3, 3).unwrap(), [-1, 1, -4]);
    assert_eq!(packing::pack(&[-128, 127], 8).unwrap(), [0x80, 0x7F]);

    for bits in [0, 9] {
        assert_eq!(packing::pack(&[0], bits), Err(PackError::InvalidBits { bits }));
        assert_eq!(packing::pack_unsigned(&[0], bits), Err(PackError::InvalidBits { bits }));
        assert_eq!(packing::unpack(&[0], bits, 1), Err(PackError::InvalidBits { bits }));
        assert_eq!(packing::unpack_unsigned(&[0], bits, 1), Err(PackError::InvalidBits { bits }));
    }
    assert_eq!(packing::pack(&[0, 4], 3), Err(PackError::ValueOutOfRange { index: 1, value: 4, bits: 3 }));
    assert_eq!(packing::pack(&[-5], 3), Err(PackError::ValueOutOfRange { index: 0, value: -5, bits: 3 }));
    assert_eq!(packing::pack_unsigned(&[8], 3), Err(PackError::ValueOutOfRange { index: 0, value: 8, bits: 3 }));
    assert_eq!(packing::unpack(&[0; 2], 3, 6), Err(PackError::ShortBuffer { n: 6, bits: 3, needed: 3, got: 2 }));
    assert_eq!(packing::packed_len(usize::MAX, 8), usize::MAX);
    assert_eq!(packing::packed_len(usize::MAX, 1), usize::MAX.div_ceil(8));
}
