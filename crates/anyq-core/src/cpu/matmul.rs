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

/// Rows of x per register tile of `matmul_small_k`.
const SMALL_K_ROWS: usize = 4;

/// `a` (`[rows, cols]`) transposed, `[cols, rows]`.
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| a[(i % rows) * cols + i / rows]).collect()
}

/// `out[m, n] = x[m, k] · w[k, n]` for a small k (MixQ's few outlier channels), with w stored
/// `[k, n]`, the transpose of a linear layer's weight, so that each value of x scales a
/// contiguous row of w. Register tiles of 4 rows of x × 16 outputs sum over all of k. Each output
/// adds its k products in order (`mul_add` from 0), so the result depends neither on the tiling
/// nor on the threads. (`matmul_xwt` would pack both operands and split the work for a product
/// this thin, which costs more than the product.)
pub fn matmul_small_k(x: &[f32], w: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    assert_eq!(x.len(), m * k, "matmul_small_k: x is not [m={m}, k={k}]");
    assert_eq!(w.len(), k * n, "matmul_small_k: w is not [k={k}, n={n}]");
    assert_eq!(out.len(), m * n, "matmul_small_k: out is not [m={m}, n={n}]");
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    let rows = |(x, out): (&[f32], &mut [f32])| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { small_k_rows_avx2(x, w, out, n, k) };
        }
        small_k_rows::<8>(x, w, out, n, k);
    };
    if m * n * k < PARALLEL_MIN_WORK {
        return rows((x, out));
    }
    let tasks = 4 * rayon::current_num_threads();
    let rows_per_task = m.div_ceil(tasks).next_multiple_of(SMALL_K_ROWS);
    x.par_chunks(rows_per_task * k).zip(out.par_chunks_mut(rows_per_task * n)).for_each(rows);
}

/// 4 rows × 16 outputs: 8 ymm accumulators (the compiler keeps a wider tile in memory).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn small_k_rows_avx2(x: &[f32], w: &[f32], out: &mut [f32], n: usize, k: usize) {
    small_k_rows::<16>(x, w, out, n, k);
}

/// `matmul_small_k` on rows of x (`[rows, k]`) and out (`[rows, n]`), in tiles of `COLS` outputs.
#[inline(always)]
fn small_k_rows<const COLS: usize>(x: &[f32], w: &[f32], out: &mut [f32], n: usize, k: usize) {
    for (x, out) in x.chunks(SMALL_K_ROWS * k).zip(out.chunks_mut(SMALL_K_ROWS * n)) {
        match x.len() / k {
            4 => small_k_tiles::<4, COLS>(x, w, out, n, k),
            3 => small_k_tiles::<3, COLS>(x, w, out, n, k),
            2 => small_k_tiles::<2, COLS>(x, w, out, n, k),
            _ => small_k_tiles::<1, COLS>(x, w, out, n, k),
        }
    }
}

/// R rows: whole tiles of `COLS` outputs, then one tile of the rest of n, padded with zeros.
#[inline(always)]
fn small_k_tiles<const R: usize, const COLS: usize>(x: &[f32], w: &[f32], out: &mut [f32], n: usize, k: usize) {
    // The R values of each column of x, side by side: read in the tiles' loop without checks.
    let x: Vec<[f32; R]> = (0..k).map(|c| std::array::from_fn(|r| x[r * k + c])).collect();
    let x = x.as_slice();
    let whole = n / COLS * COLS;
    for j in (0..whole).step_by(COLS) {
        let panel =
            w.chunks_exact(n).map(|row| row.get(j..j + COLS).and_then(|p| p.try_into().ok()).unwrap_or([0.0; COLS]));
        let acc = small_k_tile::<R, COLS>(x, panel);
        for (out, acc) in out.chunks_exact_mut(n).zip(&acc) {
            out[j..j + COLS].copy_from_slice(acc);
        }
    }
    if whole < n {
        let panel = w.chunks_exact(n).map(|row| {
            let mut padded = [0.0f32; COLS];
            padded[..n - whole].copy_from_slice(&row[whole..]);
            padded
        });
        let acc = small_k_tile::<R, COLS>(x, panel);
        for (out, acc) in out.chunks_exact_mut(n).zip(&acc) {
            out[whole..].copy_from_slice(&acc[..n - whole]);
        }
    }
}

/// R rows of x, given by column (`[k][R]`), times a `[k, COLS]` panel of w, given row by row,
/// summed in registers.
#[inline(always)]
fn small_k_tile<const R: usize, const COLS: usize>(
    x: &[[f32; R]],
    panel: impl Iterator<Item = [f32; COLS]>,
) -> [[f32; COLS]; R] {
    let mut acc = [[0.0f32; COLS]; R];
    // No panics in the loop (a panic edge would keep the tile in memory rather than registers).
    for (w, x) in panel.zip(x) {
        for r in 0..R {
            let a = x[r];
            for l in 0..COLS {
                acc[r][l] = a.mul_add(w[l], acc[r][l]);
            }
        }
    }
    acc
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
    fn small_k_adds_each_outputs_products_in_order() {
        // 130×576×29 is split over threads; the others run on one.
        for &(m, n, k) in &[(1, 1, 1), (1, 576, 29), (3, 7, 3), (5, 33, 0), (9, 100, 45), (130, 576, 29), (4, 31, 2)] {
            let mut rng = XorShift::new((m * 1000 + n + k) as u64);
            let x = rng.floats(m * k);
            let w = rng.floats(k * n);
            let mut out = vec![f32::NAN; m * n];
            matmul_small_k(&x, &w, &mut out, m, n, k);
            for (i, row) in out.chunks_exact(n).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    let expected = (0..k).fold(0.0f32, |acc, c| x[i * k + c].mul_add(w[c * n + j], acc));
                    assert_eq!(v.to_bits(), expected.to_bits(), "({m},{n},{k}) [{i}, {j}]");
                }
            }
        }
    }

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
