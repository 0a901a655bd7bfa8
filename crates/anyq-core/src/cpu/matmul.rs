//! `y = x·Wᵀ`, the product of every linear layer, with W stored as `[n, k]` (out × in) as
//! checkpoints store it.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::ops::dot;

/// Below this many multiply-adds a product runs on one thread: splitting costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
///
/// One row of x (decode) is a GEMV bound by reading W: rows of W are split over threads and
/// each dotted with x. More rows go to the `gemm` crate, whose packed, blocked kernel reuses
/// each loaded tile of W across rows of x.
pub fn matmul_xwt(x: &[f32], w: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    assert_eq!(x.len(), m * k, "matmul_xwt: x is not [m={m}, k={k}]");
    assert_eq!(w.len(), n * k, "matmul_xwt: w is not [n={n}, k={k}]");
    assert_eq!(out.len(), m * n, "matmul_xwt: out is not [m={m}, n={n}]");
    if m == 0 || n == 0 {
        return;
    }
    if m == 1 {
        let rows_per_task = (n / (4 * rayon::current_num_threads())).max(16);
        out.par_chunks_mut(rows_per_task).enumerate().for_each(|(chunk, out)| {
            let first = chunk * rows_per_task;
            for (j, y) in out.iter_mut().enumerate() {
                *y = dot(x, &w[(first + j) * k..(first + j + 1) * k]);
            }
        });
        return;
    }
    let parallel = m * n * k >= PARALLEL_MIN_WORK;
    // SAFETY: the asserts above bound every index that the strides below reach:
    // out (m×n, row stride n), x (m×k, row stride k), and Wᵀ read as k×n with column stride k.
    unsafe { gemm_rows(m, n, k, out.as_mut_ptr(), n, x.as_ptr(), k, w.as_ptr(), k, true, 1.0, parallel) }
}

/// `c[m, n] = alpha · a[m, k] · op(b)` for row-major operands given as pointers and row strides
/// (`lda`, `ldb`, `ldc`), through the `gemm` crate: `op(b)` is `bᵀ` for `b` stored `[n, k]`
/// (`b_transposed`, a linear layer's weight or attention's keys) or `b` stored `[k, n]`.
/// `parallel` splits the product over rayon's threads.
///
/// # Safety
/// Every element the shapes and strides reach must be valid: `a` and `b` readable, `c` writable
/// and not read or written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    b_transposed: bool,
    alpha: f32,
    parallel: bool,
) {
    let (b_cs, b_rs) = if b_transposed { (ldb as isize, 1) } else { (1, ldb as isize) };
    let parallelism = if parallel { Parallelism::Rayon(rayon::current_num_threads()) } else { Parallelism::None };
    // SAFETY: the caller's promise covers every index these strides reach.
    unsafe {
        gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            false,
            a,
            1,
            lda as isize,
            b,
            b_cs,
            b_rs,
            0.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The plain triple loop that `matmul_xwt` must agree with (f64 accumulation).
pub fn matmul_xwt_reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for l in 0..k {
                acc += x[i * k + l] as f64 * w[j * k + l] as f64;
            }
            out[i * n + j] = acc as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::XorShift;

    #[test]
    fn matches_reference_on_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (1, 37, 129), (3, 5, 7), (17, 33, 65), (64, 96, 576), (1, 1000, 576)] {
            let mut rng = XorShift::new((m * 1000 + n) as u64);
            let x = rng.floats(m * k);
            let w = rng.floats(n * k);
            let mut out = vec![f32::NAN; m * n];
            matmul_xwt(&x, &w, &mut out, m, n, k);
            let reference = matmul_xwt_reference(&x, &w, m, n, k);
            for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                // f32 accumulation over k terms of magnitude ≤ 1: error grows like k·ε.
                let bound = 4.0 * k as f32 * f32::EPSILON;
                assert!((a - b).abs() <= bound, "({m},{n},{k}) element {i}: {a} vs {b}");
            }
        }
    }
}
