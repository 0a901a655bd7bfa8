//! Products of f32 activations with weights stored in any quantized form ("weight-only"
//! quantization: GGML blocks, RTN groups, ...): the weight is dequantized piece by piece into
//! small per-thread buffers, never whole. A format only says how to dequantize a range of its
//! rows; the products here do the rest.

use std::cell::RefCell;

use anyq_core::cpu::{dot, gemm_rows};
use anyq_core::Linear;
use rayon::prelude::*;

/// Most weight rows in one prefill panel, most bytes of its f32 buffer (for long rows), and
/// the granule panels are rounded to.
const MAX_PANEL_ROWS: usize = 256;
const MAX_PANEL_BYTES: usize = 1 << 20;
const PANEL_GRANULE: usize = 16;
/// Below this many multiply-adds a prefill runs its panels on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;
/// Bytes of weight below which a GEMV task is not split further: smaller tasks cost more to
/// schedule than they save.
const MIN_TASK_BYTES: usize = 16 << 10;
/// Row-product tasks per thread, so that threads that finish early can take over work.
const TASKS_PER_THREAD: usize = 4;

thread_local! {
    /// Dequantized weight rows (a prefill panel, or one row of a GEMV), kept per thread.
    static BUFFER: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A linear layer whose `[out_features, in_features]` weight can dequantize any range of its rows.
pub trait RowDequantize: Linear {
    /// Stored bytes of one row (sizes the tasks).
    fn row_bytes(&self) -> usize;
    /// Rows `first..first + out.len() / in_features` into `out`, on the calling thread (no
    /// nested parallelism: the buffer is borrowed from this thread).
    fn dequantize_rows(&self, first: usize, out: &mut [f32]);
}

/// Rows of W per GEMV task: a few tasks per thread, none tiny.
pub fn rows_per_task(out_features: usize, row_bytes: usize) -> usize {
    let min_rows = (MIN_TASK_BYTES / row_bytes.max(1)).max(1);
    out_features.div_ceil(TASKS_PER_THREAD * rayon::current_num_threads()).max(min_rows)
}

/// `out[j] = x · W[j]` (one row of x, decode): rows split over threads, each dequantized into
/// a per-thread buffer and dotted with x.
pub fn row_gemv<W: RowDequantize + ?Sized>(w: &W, x: &[f32], out: &mut [f32]) {
    let k = w.in_features();
    assert_eq!(x.len(), k, "row_gemv: x is not one row of {k}");
    assert_eq!(out.len(), w.out_features(), "row_gemv: out is not one value per weight row");
    let rows_per_task = rows_per_task(out.len(), w.row_bytes());
    out.par_chunks_mut(rows_per_task).enumerate().for_each(|(t, out)| {
        BUFFER.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(k, 0.0);
            for (j, y) in out.iter_mut().enumerate() {
                w.dequantize_rows(t * rows_per_task + j, &mut buf[..k]);
                *y = dot(&buf[..k], x);
            }
        });
    });
}

/// `out[m, n] = x[m, k] · Wᵀ` for many rows of x (prefill), which reuse each weight many
/// times: panels of W rows are dequantized into a per-thread f32 buffer and multiplied with
/// the `gemm` crate, panels in parallel.
pub fn panel_gemm<W: RowDequantize + ?Sized>(w: &W, x: &[f32], m: usize, out: &mut [f32]) {
    let (n, k) = (w.out_features(), w.in_features());
    assert_eq!(x.len(), m * k, "panel_gemm: x is not [m={m}, k={k}]");
    assert_eq!(out.len(), m * n, "panel_gemm: out is not [m={m}, n={n}]");
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    // Panels of at most MAX_PANEL_ROWS rows and about MAX_PANEL_BYTES, as many as a multiple
    // of the thread count so that threads get equal shares (where there are enough rows). Each
    // panel repacks x inside `gemm`, so fewer, larger panels are better.
    let max_rows = (MAX_PANEL_BYTES / (4 * k.max(1))).clamp(PANEL_GRANULE, MAX_PANEL_ROWS);
    let n_panels = n.div_ceil(max_rows).next_multiple_of(threads).min(n.div_ceil(PANEL_GRANULE));
    let panel_rows = n.div_ceil(n_panels).next_multiple_of(PANEL_GRANULE);
    let n_panels = n.div_ceil(panel_rows);
    let out_ptr = SharedOut(out.as_mut_ptr());
    let panel = |p: usize| {
        let first = p * panel_rows;
        let rows = panel_rows.min(n - first);
        BUFFER.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(rows * k, 0.0);
            w.dequantize_rows(first, &mut buf[..rows * k]);
            // SAFETY: x is m×k (row stride k) and the panel rows×k (row stride k), read as its
            // transpose k×rows; the destination is columns first..first + rows of the m×n `out`
            // (row stride n), which no other panel writes, and `out` outlives every panel (the
            // caller waits for them all).
            unsafe {
                gemm_rows(m, rows, k, out_ptr.get().add(first), n, x.as_ptr(), k, buf.as_ptr(), k, true, 1.0, false)
            }
        });
    };
    if m * n * k < PARALLEL_MIN_WORK {
        (0..n_panels).for_each(panel);
    } else {
        (0..n_panels).into_par_iter().for_each(panel);
    }
}

/// The output pointer shared by tasks that each write their own columns.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: tasks write disjoint elements through the pointer, and the owner of the buffer
// waits for every task before using it again.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
