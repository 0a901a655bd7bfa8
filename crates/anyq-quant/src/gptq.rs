//! GPTQ (Frantar et al., ICLR 2023): a weight is quantized one input column at a time, and each
//! column's rounding error is spread over the columns not yet quantized, weighted by the inverse
//! Hessian `H = XᵀX` of the layer's calibration inputs. Each step is the optimal update of
//! `‖X·Wᵀ − X·Ŵᵀ‖²` given the columns fixed so far (Optimal Brain Quantization).
//!
//! - `H⁻¹` enters through its upper Cholesky factor U (`H⁻¹ = UᵀU`): quantizing column i adds
//!   `−(wᵢ − ŵᵢ)/U[i,i] · U[i, i+1..]` to the rest of the row. Rows are independent, so rows run
//!   in parallel, in tiles that share each row of U while it is in cache.
//! - Columns go in order of decreasing `H[j,j]` ("act order"), groups taking their scale and
//!   zero point from the original weight ("static groups", contiguous as the kernels need);
//!   without act order, from the group's weights as corrected when its first column is reached,
//!   as the reference implementation.
//! - Columns listed in `keep_float` (MixQ's outlier channels, which run in floating point) are
//!   not quantized: they go last, absorb the error of every quantized column, and come back as
//!   corrected float columns.
//! - A dead input (`H[i,i] = 0`, never active in calibration) gets weight 0, and `damp` times the
//!   mean diagonal is added to H, as in the paper, so that the factorization exists.

use rayon::prelude::*;

use crate::quantizer::{Granularity, GroupParams, QuantError, QuantSpec, QuantizedMatrix};

/// Rows of W processed together: each row of U is read once per tile.
const ROW_TILE: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqOptions {
    /// Added to H's diagonal, as a fraction of its mean (the paper's 1%).
    pub damp: f64,
    /// Quantize the columns of largest `H[j,j]` (most activated inputs) first, while many
    /// columns remain to absorb their error ("act order"). Groups then take their parameters
    /// from the original weight ("static groups"), so that they stay contiguous runs of a row
    /// as the integer kernels need.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self { damp: 0.01, act_order: true }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GptqError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("the Hessian has {found} values, expected {k}x{k}")]
    HessianShape { k: usize, found: usize },
    #[error("the Hessian is not positive definite even after damping (pivot {pivot} at column {col})")]
    NotPositiveDefinite { col: usize, pivot: f64 },
    #[error("keep_float column {0} is out of range")]
    KeepOutOfRange(usize),
}

/// The result: the quantized weight (the `keep_float` columns quantized too, for storage
/// formats that keep every column) and the corrected float columns of `keep_float`, `[n, len]`
/// in the order given.
pub struct GptqResult {
    pub quantized: QuantizedMatrix,
    pub float_columns: Vec<f32>,
}

/// Quantizes `w` (`[n, k]`) with `spec` by GPTQ, given the Hessian `h` (`[k, k]`, `XᵀX` of
/// the inputs up to a positive factor, in f64).
pub fn gptq(
    w: &[f32],
    n: usize,
    k: usize,
    h: &[f64],
    spec: &QuantSpec,
    options: GptqOptions,
    keep_float: &[usize],
) -> Result<GptqResult, GptqError> {
    spec.validate()?;
    if w.len() != n * k {
        return Err(QuantError::ShapeMismatch { rows: n, cols: k, len: w.len() }.into());
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite { row: i / k, col: i % k, value: w[i] }.into());
    }
    if h.len() != k * k {
        return Err(GptqError::HessianShape { k, found: h.len() });
    }
    let mut keep = vec![false; k];
    for &j in keep_float {
        *keep.get_mut(j).ok_or(GptqError::KeepOutOfRange(j))? = true;
    }
    // Processing order: quantized columns (in order, or by decreasing H[j,j]), then the float ones.
    let mut quantized: Vec<usize> = (0..k).filter(|&j| !keep[j]).collect();
    if options.act_order {
        quantized.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
    }
    let order: Vec<usize> = quantized.into_iter().chain((0..k).filter(|&j| keep[j])).collect();
    let quantized_len = k - keep.iter().filter(|&&f| f).count();
    // Where each `keep_float` column stands in the processing order.
    let mut position = vec![0; k];
    order.iter().enumerate().for_each(|(a, &j)| position[j] = a);
    let kept_at: Vec<usize> = keep_float.iter().map(|&j| position[j]).collect();

    let mut hp: Vec<f64> = order.iter().flat_map(|&a| order.iter().map(move |&b| h[a * k + b])).collect();
    let dead: Vec<bool> = (0..k).map(|a| hp[a * k + a] <= 0.0).collect();
    let mean_diag = (0..k).filter(|&a| !dead[a]).map(|a| hp[a * k + a]).sum::<f64>() / k.max(1) as f64;
    let damp = options.damp * if mean_diag > 0.0 { mean_diag } else { 1.0 };
    for a in 0..k {
        if dead[a] {
            hp[a * k + a] = 1.0;
        }
        hp[a * k + a] += damp;
    }
    let u = inverse_upper_cholesky(&hp, k)?;

    let group = match spec.granularity {
        Granularity::PerGroup(g) => g,
        _ => k.max(1),
    };
    let groups_per_row = k.div_ceil(group).max(1);
    // `[n, groups_per_row]` parameters from the original weight: per channel, per tensor, and
    // static groups; `None`: each group's from its weights as corrected when it is reached.
    let static_params: Option<Vec<GroupParams>> = match spec.granularity {
        Granularity::PerGroup(_) if !options.act_order => None,
        Granularity::PerTensor => Some(vec![spec.group_params(w)?; n]),
        _ => Some(
            w.chunks_exact(k.max(1))
                .flat_map(|row| row.chunks(group))
                .map(|g| spec.group_params(g))
                .collect::<Result<_, _>>()?,
        ),
    };

    let mut values = vec![0i8; n * k];
    let mut params = vec![GroupParams { scale: 1.0, zero: 0 }; n * groups_per_row];
    let tiles = values.par_chunks_mut(ROW_TILE * k).zip(params.par_chunks_mut(ROW_TILE * groups_per_row));
    let float_tiles = tiles.enumerate().map(|(tile, (values, params))| {
        let first = tile * ROW_TILE;
        let rows = values.len() / k.max(1);
        // The tile's rows in processing order, corrected as columns are quantized.
        let mut rows_p: Vec<Vec<f32>> =
            (first..first + rows).map(|r| order.iter().map(|&j| w[r * k + j]).collect()).collect();
        for (a, row) in rows_p.iter_mut().flat_map(|row| row.iter_mut().enumerate()) {
            if dead[a] {
                *row = 0.0;
            }
        }
        let mut have_params = vec![false; rows * groups_per_row];
        let mut floats = vec![0.0f32; rows * keep_float.len()];
        for a in 0..quantized_len {
            let j = order[a];
            let g = j / group;
            let d = u[a * k + a];
            let u_row = &u[a * k..(a + 1) * k];
            for (r, row) in rows_p.iter_mut().enumerate() {
                let p = match &static_params {
                    Some(fixed) => fixed[(first + r) * groups_per_row + g],
                    None if have_params[r * groups_per_row + g] => params[r * groups_per_row + g],
                    None => {
                        // The group's quantized columns, as corrected so far (all still ahead).
                        let members: Vec<f32> =
                            (a..quantized_len).filter(|&b| order[b] / group == g).map(|b| row[b]).collect();
                        let p = spec.group_params(&members)?;
                        have_params[r * groups_per_row + g] = true;
                        p
                    }
                };
                params[r * groups_per_row + g] = p;
                let q = spec.quantize_value(row[a], p);
                values[r * k + j] = q;
                let err = (row[a] - p.dequantize(q)) / d;
                for (x, &uv) in row[a + 1..].iter_mut().zip(&u_row[a + 1..]) {
                    *x -= err * uv;
                }
            }
        }
        // The float columns: their corrected values, and a quantized copy for storage.
        for (r, row) in rows_p.iter().enumerate() {
            for (c, (&j, &a)) in keep_float.iter().zip(&kept_at).enumerate() {
                floats[r * keep_float.len() + c] = row[a];
                let g = j / group;
                let p = match &static_params {
                    Some(fixed) => fixed[(first + r) * groups_per_row + g],
                    None => params[r * groups_per_row + g],
                };
                values[r * k + j] = spec.quantize_value(row[a], p);
            }
        }
        Ok::<_, GptqError>(floats)
    });
    let float_columns = float_tiles.collect::<Result<Vec<_>, _>>()?.concat();
    let scales = params.iter().map(|p| p.scale).collect();
    let zeros = if spec.symmetric { Vec::new() } else { params.iter().map(|p| p.zero).collect() };
    let (scales, zeros) = match spec.granularity {
        Granularity::PerTensor => (vec![params[0].scale], zeros.into_iter().take(1).collect()),
        _ => (scales, zeros),
    };
    Ok(GptqResult {
        quantized: QuantizedMatrix { rows: n, cols: k, spec: *spec, values, scales, zeros },
        float_columns,
    })
}

/// The upper Cholesky factor U of `A⁻¹` (`A⁻¹ = UᵀU`) for symmetric positive definite `A`
/// (`[k, k]`): with J the order reversal, `U = J · L⁻¹ · J` where `L` is the lower Cholesky
/// factor of `J·A·J`, so one factorization and one triangular inverse suffice. f32 result.
fn inverse_upper_cholesky(a: &[f64], k: usize) -> Result<Vec<f32>, GptqError> {
    let rev = |i: usize| k - 1 - i;
    let mut l: Vec<f64> = (0..k * k).map(|i| a[rev(i / k) * k + rev(i % k)]).collect();
    cholesky_lower_in_place(&mut l, k)?;
    let l_inv = lower_triangular_inverse(&l, k);
    Ok((0..k * k).map(|i| l_inv[rev(i / k) * k + rev(i % k)] as f32).collect())
}

/// Overwrites the lower triangle of `a` with its Cholesky factor L (`A = LLᵀ`), zeroing the
/// upper triangle. Left-looking: column j needs rows' prefixes only, so rows run in parallel.
fn cholesky_lower_in_place(a: &mut [f64], k: usize) -> Result<(), GptqError> {
    for j in 0..k {
        let rest = &mut a[j * k..];
        let row_j = &mut rest[..k];
        let pivot = row_j[j] - dot(&row_j[..j], &row_j[..j]);
        if !(pivot > 0.0 && pivot.is_finite()) {
            return Err(GptqError::NotPositiveDefinite { col: j, pivot });
        }
        let diag = pivot.sqrt();
        row_j[j] = diag;
        row_j[j + 1..].fill(0.0);
        let row_j = &rest[..k];
        let (row_j_prefix, below) = (row_j[..j].to_vec(), &mut rest[k..]);
        below.par_chunks_mut(k).for_each(|row_i| {
            row_i[j] = (row_i[j] - dot(&row_i[..j], &row_j_prefix)) / diag;
        });
    }
    Ok(())
}

/// `L⁻¹` for lower triangular L: column c solves `L·x = e_c` by forward substitution.
fn lower_triangular_inverse(l: &[f64], k: usize) -> Vec<f64> {
    let columns: Vec<Vec<f64>> = (0..k)
        .into_par_iter()
        .map(|c| {
            let mut x = vec![0.0; k];
            x[c] = 1.0 / l[c * k + c];
            for i in c + 1..k {
                x[i] = -dot(&l[i * k + c..i * k + i], &x[c..i]) / l[i * k + i];
            }
            x
        })
        .collect();
    (0..k * k).map(|i| columns[i % k][i / k]).collect()
}

/// With independent partial sums, so that the compiler can keep them in vector lanes (one
/// running sum would serialize every add).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let (a_body, b_body) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = a_body.remainder().iter().zip(b_body.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_body.zip(b_body) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantizer::{quantize, ScaleSearch};
    use anyq_core::testing::XorShift;

    /// `x` (`[t, k]`) with correlated columns: a few shared factors plus noise, as activations.
    fn activations(t: usize, k: usize, rng: &mut XorShift) -> Vec<f32> {
        let factors: Vec<Vec<f32>> = (0..4).map(|_| (0..k).map(|_| rng.uniform()).collect()).collect();
        let mut x = Vec::with_capacity(t * k);
        for _ in 0..t {
            let mix: Vec<f32> = (0..4).map(|_| rng.uniform()).collect();
            for j in 0..k {
                let shared: f32 = mix.iter().zip(&factors).map(|(m, f)| m * f[j]).sum();
                x.push(0.15 * rng.uniform() + shared);
            }
        }
        x
    }

    fn hessian(x: &[f32], t: usize, k: usize) -> Vec<f64> {
        let mut h = vec![0.0; k * k];
        for row in x.chunks_exact(k).take(t) {
            for a in 0..k {
                for b in 0..k {
                    h[a * k + b] += row[a] as f64 * row[b] as f64;
                }
            }
        }
        h
    }

    /// `‖X·(W − Ŵ)ᵀ‖²`.
    fn output_error(x: &[f32], w: &[f32], w_hat: &[f32], n: usize, k: usize) -> f64 {
        x.chunks_exact(k)
            .map(|xr| {
                (0..n)
                    .map(|r| {
                        let e: f64 = (0..k).map(|j| xr[j] as f64 * (w[r * k + j] - w_hat[r * k + j]) as f64).sum();
                        e * e
                    })
                    .sum::<f64>()
            })
            .sum()
    }

    #[test]
    fn inverse_upper_cholesky_factors_the_inverse() {
        let mut rng = XorShift::new(3);
        let k = 7;
        let x = activations(40, k, &mut rng);
        let mut h = hessian(&x, 40, k);
        (0..k).for_each(|i| h[i * k + i] += 0.1);
        let u = inverse_upper_cholesky(&h, k).unwrap();
        // Uᵀ·U·H = I.
        for i in 0..k {
            for j in 0..k {
                let v: f64 = (0..k)
                    .map(|m| (0..k).map(|p| u[p * k + i] as f64 * u[p * k + m] as f64).sum::<f64>() * h[m * k + j])
                    .sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-4, "({i},{j}) = {v}");
            }
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0, "U is upper triangular");
            }
        }
    }

    #[test]
    fn with_a_diagonal_hessian_gptq_is_round_to_nearest() {
        let mut rng = XorShift::new(5);
        let (n, k) = (9, 40);
        let w: Vec<f32> = (0..n * k).map(|_| 0.5 * rng.uniform()).collect();
        let h: Vec<f64> = (0..k * k).map(|i| if i % (k + 1) == 0 { 1.0 + (i % 7) as f64 } else { 0.0 }).collect();
        for spec in
            [QuantSpec::new(4, false, Granularity::PerGroup(16)), QuantSpec::new(3, true, Granularity::PerChannel)]
        {
            let g = gptq(&w, n, k, &h, &spec, GptqOptions::default(), &[]).unwrap();
            assert_eq!(g.quantized, quantize(&w, n, k, &spec).unwrap(), "{spec:?}");
        }
    }

    #[test]
    fn gptq_beats_rtn_on_the_calibration_objective() {
        let mut rng = XorShift::new(11);
        let (n, k, t) = (24, 72, 256);
        let x = activations(t, k, &mut rng);
        let h = hessian(&x, t, k);
        let w: Vec<f32> = (0..n * k).map(|_| 0.5 * rng.uniform()).collect();
        // A ragged last group (72 = 2·32 + 8) and an MSE search too.
        let mut mse = QuantSpec::new(3, false, Granularity::PerGroup(32));
        mse.search = ScaleSearch::Mse { steps: 20, min_ratio: 0.5 };
        for spec in
            [QuantSpec::new(4, false, Granularity::PerGroup(32)), QuantSpec::new(4, true, Granularity::PerChannel), mse]
        {
            let rtn = quantize(&w, n, k, &spec).unwrap().dequantize();
            let g = gptq(&w, n, k, &h, &spec, GptqOptions::default(), &[]).unwrap().quantized.dequantize();
            let (e_rtn, e_gptq) = (output_error(&x, &w, &rtn, n, k), output_error(&x, &w, &g, n, k));
            assert!(e_gptq < 0.7 * e_rtn, "{spec:?}: GPTQ {e_gptq} vs RTN {e_rtn}");
        }
    }

    #[test]
    fn float_columns_absorb_the_error() {
        let mut rng = XorShift::new(17);
        let (n, k, t) = (8, 48, 200);
        let x = activations(t, k, &mut rng);
        let h = hessian(&x, t, k);
        let w: Vec<f32> = (0..n * k).map(|_| 0.5 * rng.uniform()).collect();
        let spec = QuantSpec::new(4, false, Granularity::PerGroup(16));
        let keep = [5, 30, 31];
        let plain = gptq(&w, n, k, &h, &spec, GptqOptions::default(), &[]).unwrap().quantized.dequantize();
        let mixed = gptq(&w, n, k, &h, &spec, GptqOptions::default(), &keep).unwrap();
        let mut w_hat = mixed.quantized.dequantize();
        for r in 0..n {
            for (c, &j) in keep.iter().enumerate() {
                w_hat[r * k + j] = mixed.float_columns[r * keep.len() + c];
            }
        }
        let (e_plain, e_mixed) = (output_error(&x, &w, &plain, n, k), output_error(&x, &w, &w_hat, n, k));
        assert!(e_mixed < 0.8 * e_plain, "float columns {e_mixed} vs none {e_plain}");
        assert_eq!(gptq(&w, n, k, &h, &spec, GptqOptions::default(), &[48]).err(), Some(GptqError::KeepOutOfRange(48)));
        assert!(matches!(
            gptq(&w, n, k, &h[1..], &spec, GptqOptions::default(), &[]),
            Err(GptqError::HessianShape { .. })
        ));
    }
}
