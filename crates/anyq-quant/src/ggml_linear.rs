//! A linear layer whose weight stays in its GGML block format: `y = x·Wᵀ (+ b)` with f32
//! activations, computed from the stored blocks without ever holding the whole f32 weight.
//!
//! The result is the product with the dequantized weight (exactly the values
//! [`GgmlType::dequantize`] gives) up to the order of f32 summation; activations are never
//! quantized. Three paths:
//!
//! * one row of x (decode) is a GEMV bound by reading W, so reading fewer bytes is the whole
//!   point: rows of W are split over rayon threads and each block is expanded in registers and
//!   dotted with x. Q4_0, Q4_1 and Q8_0 have AVX2/FMA/F16C kernels (detected at run time);
//!   every other type, and every type on other CPUs, goes through
//!   [`crate::dequant_matmul::row_gemv`] (each row dequantized into a per-thread buffer).
//! * a few rows of x (short prompts, fast types only) use the same kernels, each block
//!   expanded once for four rows of x.
//! * more rows (prefill) reuse each weight many times: [`crate::dequant_matmul::panel_gemm`].
//!
//! In the fast kernels, Q4_0 and Q8_0 weights are `d·q` with small integers q and an f16 scale
//! d; `d·q` is exact in f32, so factoring d out of each block's sum only reorders the
//! rounding. Q4_1 weights `d·q + m` are rebuilt one by one with a fused multiply-add, which
//! rounds exactly as dequantization does (`d·q` being exact). Factoring m out as well
//! (`d·Σ q·x + m·Σ x`, as llama.cpp does with its 8-bit sums) would save about an eighth of
//! the decode time but make the two terms cancel when x has a common sign, for errors up to
//! ten times those of the dense product.

use anyq_core::cpu::add_bias;
use anyq_core::Linear;
use rayon::prelude::*;

use crate::dequant_matmul::{panel_gemm, row_gemv, rows_per_task, RowDequantize, SharedOut};
use crate::ggml::{GgmlError, GgmlType};

/// Elements dequantized per call when filling a prefill panel: below the size at which
/// [`GgmlType::dequantize`] goes parallel (a nested parallel call could run another panel on
/// this thread while its buffer is borrowed), and a multiple of every block size.
const SEQUENTIAL_CHUNK: usize = 1 << 15;
/// Most rows of x that the fast types multiply with the blocks directly (each block expanded
/// once per four rows of x) instead of dequantizing panels for `gemm`, whose packing does not
/// pay off for so few rows (measured: the direct product is faster up to about 20 rows).
const MAX_DIRECT_ROWS: usize = 20;

/// A `[out_features, in_features]` weight stored as GGML blocks (each row a whole number of
/// blocks, rows back to back, as in a GGUF file), with an optional f32 bias.
#[derive(Clone, Debug)]
pub struct GgmlLinear {
    ggml_type: GgmlType,
    bytes: Vec<u8>,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
    row_bytes: usize,
}

impl GgmlLinear {
    /// Checks that rows are whole blocks, that `bytes` holds exactly `out_features` rows and
    /// that the bias (reported as an F32 tensor) has `out_features` values.
    pub fn new(
        ggml_type: GgmlType,
        bytes: Vec<u8>,
        bias: Option<Vec<f32>>,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self, GgmlError> {
        let n_elements = out_features
            .checked_mul(in_features)
            .ok_or(GgmlError::TooLarge { ty: ggml_type, n_elements: usize::MAX })?;
        let row_bytes = ggml_type.bytes_for(in_features)?;
        let expected = ggml_type.bytes_for(n_elements)?;
        if bytes.len() != expected {
            return Err(GgmlError::LengthMismatch { ty: ggml_type, n_elements, expected, got: bytes.len() });
        }
        if let Some(b) = &bias {
            if b.len() != out_features {
                let f32_bytes = |n: usize| n.saturating_mul(4);
                return Err(GgmlError::LengthMismatch {
                    ty: GgmlType::F32,
                    n_elements: out_features,
                    expected: f32_bytes(out_features),
                    got: f32_bytes(b.len()),
                });
            }
        }
        Ok(Self { ggml_type, bytes, bias, out_features, in_features, row_bytes })
    }

    /// Whether `ggml_type` has specialised kernels (on x86-64 CPUs with AVX2, FMA and F16C;
    /// elsewhere these types take the generic path too). Every type works; the others
    /// dequantize in the decode product (m = 1), correct but slower than a dense weight.
    pub fn supports(ggml_type: GgmlType) -> bool {
        matches!(ggml_type, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// The stored blocks, rows back to back.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Dequantizes weight row `row` (e.g. one token's embedding) into `out`, whose length must
    /// be `in_features`; the values are exactly those of [`GgmlType::dequantize`]. Panics if
    /// `row >= out_features`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.out_features, "GgmlLinear::dequantize_row: row {row} of {}", self.out_features);
        assert_eq!(out.len(), self.in_features, "GgmlLinear::dequantize_row: out is not in_features long");
        let w = &self.bytes[row * self.row_bytes..(row + 1) * self.row_bytes];
        Kernel::select(self.ggml_type).dequantize(self.ggml_type, w, out);
    }

    /// The decode product: `out[j] = x · W[j]`, rows split over threads.
    fn gemv(&self, kernel: Kernel, x: &[f32], out: &mut [f32]) {
        let rows_per_task = rows_per_task(self.out_features, self.row_bytes);
        out.par_chunks_mut(rows_per_task)
            .zip(self.bytes.par_chunks(rows_per_task * self.row_bytes))
            .for_each(|(out, w)| kernel.gemv(self.ggml_type, w, self.row_bytes, x, out));
    }

    /// A few rows of x against the blocks directly (fast types only): rows of W split over
    /// threads, each task writing its columns of every row of `out`.
    fn direct(&self, kernel: Kernel, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.out_features, self.in_features);
        let rows_per_task = rows_per_task(self.out_features, self.row_bytes);
        let out_ptr = SharedOut(out.as_mut_ptr());
        self.bytes.par_chunks(rows_per_task * self.row_bytes).enumerate().for_each(|(t, w)| {
            let first = t * rows_per_task;
            let rows = w.len() / self.row_bytes;
            // SAFETY: `out` is m×n (checked by `forward`) and outlives every task; this task
            // alone writes columns first..first + rows, the rows of W it holds.
            unsafe { kernel.direct(self.ggml_type, w, self.row_bytes, x, m, k, out_ptr.get(), n, first, rows) };
        });
    }
}

impl RowDequantize for GgmlLinear {
    fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        let rows = out.len() / self.in_features.max(1);
        let w = &self.bytes[first * self.row_bytes..(first + rows) * self.row_bytes];
        Kernel::select(self.ggml_type).dequantize(self.ggml_type, w, out);
    }
}

impl Linear for GgmlLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.out_features, self.in_features);
        assert_eq!(x.len(), m * k, "GgmlLinear: x is not [m={m}, k={k}]");
        assert_eq!(out.len(), m * n, "GgmlLinear: out is not [m={m}, n={n}]");
        if m == 0 || n == 0 {
            return;
        }
        let kernel = Kernel::select(self.ggml_type);
        if k == 0 {
            out.fill(0.0);
        } else if kernel == Kernel::Generic && m == 1 {
            row_gemv(self, x, out);
        } else if m == 1 {
            self.gemv(kernel, x, out);
        } else if kernel != Kernel::Generic && m <= MAX_DIRECT_ROWS {
            self.direct(kernel, x, m, out);
        } else {
            panel_gemm(self, x, m, out);
        }
        if let Some(bias) = &self.bias {
            add_bias(out, bias);
        }
    }

    /// The stored blocks plus the f32 bias.
    fn weight_bytes(&self) -> usize {
        self.bytes.len() + self.bias.as_ref().map_or(0, |b| b.len() * std::mem::size_of::<f32>())
    }

    fn weight_row(&self, row: usize, out: &mut [f32]) {
        self.dequantize_row(row, out);
    }

    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Dequantizes whole blocks on the calling thread, in pieces small enough that
/// [`GgmlType::dequantize`] never goes parallel.
fn dequantize_sequential(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let bytes_per_piece = SEQUENTIAL_CHUNK / ty.block_size() * ty.type_size();
    for (s, d) in src.chunks(bytes_per_piece).zip(dst.chunks_mut(SEQUENTIAL_CHUNK)) {
        ty.dequantize(s, d).expect("GgmlLinear: block lengths were checked at construction");
    }
}

/// The kernels for one type on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Q4_0Avx2,
    #[cfg(target_arch = "x86_64")]
    Q4_1Avx2,
    #[cfg(target_arch = "x86_64")]
    Q8_0Avx2,
}

impl Kernel {
    fn select(ty: GgmlType) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            match ty {
                GgmlType::Q4_0 => return Kernel::Q4_0Avx2,
                GgmlType::Q4_1 => return Kernel::Q4_1Avx2,
                GgmlType::Q8_0 => return Kernel::Q8_0Avx2,
                _ => {}
            }
        }
        let _ = ty;
        Kernel::Generic
    }

    /// Checks the lengths that the x86 kernels rely on: `w` holds `rows` rows of `row_bytes`,
    /// x is `m` rows of `k` values and one row of W is `k` values of `ty`.
    #[allow(clippy::too_many_arguments)]
    fn check(self, ty: GgmlType, w: &[u8], row_bytes: usize, rows: usize, x: &[f32], m: usize, k: usize) {
        assert_eq!(w.len(), rows * row_bytes, "GgmlLinear: rows and outputs disagree");
        assert_eq!(x.len(), m * k, "GgmlLinear: x is not m rows");
        assert_eq!(ty.bytes_for(k), Ok(row_bytes), "GgmlLinear: a row of x is not a row of W");
    }

    /// `out[j] = x · W[j]` for the rows stored in `w` (`out.len()` rows of `row_bytes`).
    fn gemv(self, ty: GgmlType, w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
        self.check(ty, w, row_bytes, out.len(), x, 1, x.len());
        match self {
            Kernel::Generic => unreachable!("GgmlLinear: the generic path multiplies through `row_gemv`"),
            // SAFETY (all three): `select` checked the CPU features, `ty` is the kernel's type
            // and `check` gave the lengths each kernel relies on.
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_0Avx2 => unsafe { x86::q4_0::gemv(w, row_bytes, x, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_1Avx2 => unsafe { x86::q4_1::gemv(w, row_bytes, x, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Q8_0Avx2 => unsafe { x86::q8_0::gemv(w, row_bytes, x, out) },
        }
    }

    /// `out[i·n + first + j] = x[i] · W[j]` for the `rows` rows stored in `w` and the `m`
    /// rows of x. Only for the fast kernels.
    ///
    /// # Safety
    /// `out` points to `m·n` writable values, which nothing else reads or writes in columns
    /// `first..first + rows` during the call.
    #[allow(clippy::too_many_arguments)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    unsafe fn direct(
        self,
        ty: GgmlType,
        w: &[u8],
        row_bytes: usize,
        x: &[f32],
        m: usize,
        k: usize,
        out: *mut f32,
        n: usize,
        first: usize,
        rows: usize,
    ) {
        self.check(ty, w, row_bytes, rows, x, m, k);
        assert!(first + rows <= n, "GgmlLinear: columns {first}..{} of {n}", first + rows);
        match self {
            Kernel::Generic => unreachable!("GgmlLinear: no direct kernel for the generic path"),
            // SAFETY (all three): as in `gemv`, plus the caller's promise about `out`, whose
            // columns from `first` on hold `rows` values per row.
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_0Avx2 => unsafe { x86::q4_0::direct(w, row_bytes, x, m, out.add(first), n) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_1Avx2 => unsafe { x86::q4_1::direct(w, row_bytes, x, m, out.add(first), n) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Q8_0Avx2 => unsafe { x86::q8_0::direct(w, row_bytes, x, m, out.add(first), n) },
        }
    }

    /// Dequantizes whole blocks of `ty` on the calling thread, exactly as
    /// [`GgmlType::dequantize`] does.
    fn dequantize(self, ty: GgmlType, src: &[u8], dst: &mut [f32]) {
        assert_eq!(ty.bytes_for(dst.len()), Ok(src.len()), "GgmlLinear: dequantize lengths");
        match self {
            Kernel::Generic => dequantize_sequential(ty, src, dst),
            // SAFETY (all three): `select` checked the CPU features, `ty` is the kernel's type
            // and the assert above gives the lengths.
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_0Avx2 => unsafe { x86::q4_0::dequantize(src, dst) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_1Avx2 => unsafe { x86::q4_1::dequantize(src, dst) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Q8_0Avx2 => unsafe { x86::q8_0::dequantize(src, dst) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 kernels for the legacy 32-element formats. A block is decoded into four vectors of
    //! eight f32 values and a scale whose product is exactly the dequantized block: for Q4_0
    //! and Q8_0 the integers and d, for Q4_1 the weights themselves and 1. The products
    //! multiply the values with x and scale each block's sum; dequantization multiplies the
    //! scale back in.
    //!
    //! Every function here is an `unsafe fn` with the target features, and per-format code is
    //! expanded by a macro rather than passed as a closure, so that everything is compiled
    //! for AVX2 and inlined on every supported compiler.

    use std::arch::x86_64::*;

    const QK: usize = 32;
    /// Rows of W per tile of the few-rows product.
    const TILE_ROWS: usize = 16;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    /// A decoded block: values for elements 0..8, 8..16, 16..24, 24..32, and the scale (in
    /// every lane) that multiplies them into the block's weights.
    type Decoded = ([__m256; 4], __m256);

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The f16 at `p`, as f32 in every lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_splat(p: *const u8) -> __m256 {
        let h = std::ptr::read_unaligned(p as *const u16);
        _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// Eight unsigned bytes at `p` widened to i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn u8x8(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }

    /// Eight signed bytes at `p` widened to i32 lanes, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i8x8_f32(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// The 32 nibbles of the 16 bytes at `qs` as four vectors of elements 0..8, 8..16,
    /// 16..24, 24..32 (element j in the low nibble of byte j, element j + 16 in its high one).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(qs: *const u8) -> [__m256i; 4] {
        let mask = _mm256_set1_epi32(0x0F);
        let (a, b) = (u8x8(qs), u8x8(qs.add(8)));
        [_mm256_and_si256(a, mask), _mm256_and_si256(b, mask), _mm256_srli_epi32::<4>(a), _mm256_srli_epi32::<4>(b)]
    }

    /// Q4_0 (d: f16, 16 bytes of nibbles; x = d·(q − 8)): the integers q − 8 and d.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_decode(p: *const u8) -> Decoded {
        let eight = _mm256_set1_epi32(8);
        let [a, b, c, d] = nibbles(p.add(2));
        let f = [
            _mm256_sub_epi32(a, eight),
            _mm256_sub_epi32(b, eight),
            _mm256_sub_epi32(c, eight),
            _mm256_sub_epi32(d, eight),
        ];
        (
            [_mm256_cvtepi32_ps(f[0]), _mm256_cvtepi32_ps(f[1]), _mm256_cvtepi32_ps(f[2]), _mm256_cvtepi32_ps(f[3])],
            f16_splat(p),
        )
    }

    /// Q4_1 (d, m: f16, 16 bytes of nibbles; x = d·q + m): the weights, each `fma(q, d, m)`,
    /// which rounds once as ggml's `q·d + m` does (`q·d` is exact), and 1.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_decode(p: *const u8) -> Decoded {
        // [d, m, 0, 0] from the two f16 in one conversion.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        let (d, m) = (_mm256_broadcastss_ps(dm), _mm256_broadcastss_ps(_mm_movehdup_ps(dm)));
        let [a, b, c, e] = nibbles(p.add(4));
        let w = [
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), d, m),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), d, m),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), d, m),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(e), d, m),
        ];
        (w, _mm256_set1_ps(1.0))
    }

    /// Q8_0 (d: f16, 32 i8; x = q·d): the integers q and d.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_decode(p: *const u8) -> Decoded {
        ([i8x8_f32(p.add(2)), i8x8_f32(p.add(10)), i8x8_f32(p.add(18)), i8x8_f32(p.add(26))], f16_splat(p))
    }

    /// `Σ v[i]·x[i]` over one block, in eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_dot(v: &[__m256; 4], x: *const f32) -> __m256 {
        let s = _mm256_mul_ps(v[0], _mm256_loadu_ps(x));
        let s = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x.add(8)), s);
        let s = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(x.add(16)), s);
        _mm256_fmadd_ps(v[3], _mm256_loadu_ps(x.add(24)), s)
    }

    /// The kernels of one format, from its decoder and block size in bytes.
    macro_rules! format_kernels {
        ($format:ident, $decode:ident, $block_bytes:expr) => {
            pub mod $format {
                use super::*;

                const BLOCK_BYTES: usize = $block_bytes;

                /// `acc` plus block `b` of the row at `row` times x.
                #[inline]
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn step(row: *const u8, b: usize, x: *const f32, acc: __m256) -> __m256 {
                    let (v, scale) = $decode(row.add(b * BLOCK_BYTES));
                    _mm256_fmadd_ps(scale, block_dot(&v, x.add(b * QK)), acc)
                }

                /// `out[j] = x · W[j]` over the rows in `w`, with two accumulators (even and
                /// odd blocks) so that consecutive blocks do not wait on each other.
                ///
                /// # Safety
                /// The CPU has AVX2, FMA and F16C; `x.len()` is a multiple of 32, `row_bytes`
                /// is `x.len() / 32` blocks and `w.len() == out.len() · row_bytes`.
                #[target_feature(enable = "avx2,fma,f16c")]
                pub unsafe fn gemv(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
                    let nb = x.len() / QK;
                    debug_assert_eq!(nb * BLOCK_BYTES, row_bytes);
                    debug_assert_eq!(w.len(), out.len() * row_bytes);
                    let x = x.as_ptr();
                    for (j, y) in out.iter_mut().enumerate() {
                        let row = w.as_ptr().add(j * row_bytes);
                        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                        let mut b = 0;
                        while b + 2 <= nb {
                            acc0 = step(row, b, x, acc0);
                            acc1 = step(row, b + 1, x, acc1);
                            b += 2;
                        }
                        if b < nb {
                            acc0 = step(row, b, x, acc0);
                        }
                        *y = hsum(_mm256_add_ps(acc0, acc1));
                    }
                }

                /// One row of W (at `row`, nb blocks) against R rows of x (at `x`, row stride
                /// k), each block decoded once; result r goes to `out[r·n]`.
                #[inline]
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn group<const R: usize>(
                    row: *const u8,
                    nb: usize,
                    x: *const f32,
                    k: usize,
                    out: *mut f32,
                    n: usize,
                ) {
                    let mut acc = [_mm256_setzero_ps(); R];
                    for b in 0..nb {
                        let (v, scale) = $decode(row.add(b * BLOCK_BYTES));
                        for r in 0..R {
                            acc[r] = _mm256_fmadd_ps(scale, block_dot(&v, x.add(r * k + b * QK)), acc[r]);
                        }
                    }
                    for r in 0..R {
                        *out.add(r * n) = hsum(acc[r]);
                    }
                }

                /// `out[i·n + j] = x[i] · W[j]` for the rows of W in `w` and the m rows of x,
                /// four rows of x at a time.
                ///
                /// # Safety
                /// As [`gemv`] with x of m rows; `out` points to m rows of stride n with room
                /// for `w.len() / row_bytes` values each, which nothing else uses during the
                /// call.
                #[target_feature(enable = "avx2,fma,f16c")]
                pub unsafe fn direct(w: &[u8], row_bytes: usize, x: &[f32], m: usize, out: *mut f32, n: usize) {
                    if m == 0 {
                        return;
                    }
                    let k = x.len() / m;
                    let nb = k / QK;
                    debug_assert_eq!(nb * BLOCK_BYTES, row_bytes);
                    let xp = x.as_ptr();
                    let rows = w.len() / row_bytes;
                    // Tiles of W rows, so that a tile and four rows of x stay in L1 while the
                    // tile is multiplied with them.
                    for tile in (0..rows).step_by(TILE_ROWS) {
                        let tile = tile..rows.min(tile + TILE_ROWS);
                        let mut i = 0;
                        while i + 4 <= m {
                            let (x, out) = (xp.add(i * k), out.add(i * n));
                            for j in tile.clone() {
                                group::<4>(w.as_ptr().add(j * row_bytes), nb, x, k, out.add(j), n);
                            }
                            i += 4;
                        }
                        let (x, out) = (xp.add(i * k), out.add(i * n));
                        for j in tile {
                            let (row, out) = (w.as_ptr().add(j * row_bytes), out.add(j));
                            match m - i {
                                1 => group::<1>(row, nb, x, k, out, n),
                                2 => group::<2>(row, nb, x, k, out, n),
                                3 => group::<3>(row, nb, x, k, out, n),
                                _ => {}
                            }
                        }
                    }
                }

                /// Dequantizes whole blocks, to exactly the values of ggml's dequantization.
                ///
                /// # Safety
                /// The CPU has AVX2, FMA and F16C; `src` holds `dst.len() / 32` blocks.
                #[target_feature(enable = "avx2,fma,f16c")]
                pub unsafe fn dequantize(src: &[u8], dst: &mut [f32]) {
                    debug_assert_eq!(src.len() * QK, dst.len() * BLOCK_BYTES);
                    for (b, y) in dst.chunks_exact_mut(QK).enumerate() {
                        let (v, scale) = $decode(src.as_ptr().add(b * BLOCK_BYTES));
                        for (i, v) in v.into_iter().enumerate() {
                            _mm256_storeu_ps(y.as_mut_ptr().add(8 * i), _mm256_mul_ps(v, scale));
                        }
                    }
                }
            }
        };
    }

    format_kernels!(q4_0, q4_0_decode, 18);
    format_kernels!(q4_1, q4_1_decode, 20);
    format_kernels!(q8_0, q8_0_decode, 34);
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyq_core::testing::XorShift;

    /// Random blocks with finite f16 scales in [-1, 1) at the given offsets.
    fn blocks(ty: GgmlType, n_blocks: usize, scales: &[usize], seed: u64) -> Vec<u8> {
        let mut b = XorShift::new(seed).bytes(n_blocks * ty.type_size());
        for (i, block) in b.chunks_exact_mut(ty.type_size()).enumerate() {
            for (j, &o) in scales.iter().enumerate() {
                let v = half::f16::from_f32(((i * 7 + j * 3) % 17) as f32 / 8.5 - 1.0);
                block[o..o + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    /// The specialised kernels agree with the generic path, which other CPUs use for them,
    /// and dequantize exactly as `GgmlType::dequantize`.
    #[test]
    fn fast_kernels_match_generic_path() {
        let (n, k) = (37, 96);
        for (ty, scales) in [(GgmlType::Q4_0, &[0][..]), (GgmlType::Q4_1, &[0, 2]), (GgmlType::Q8_0, &[0])] {
            let kernel = Kernel::select(ty);
            if kernel == Kernel::Generic {
                continue; // no fast kernel on this CPU
            }
            let w = blocks(ty, n * k / 32, scales, ty.id() as u64);
            let row_bytes = ty.bytes_for(k).unwrap();

            let mut expected = vec![0.0; n * k];
            ty.dequantize(&w, &mut expected).unwrap();
            let mut got = vec![f32::NAN; n * k];
            kernel.dequantize(ty, &w, &mut got);
            assert!(got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()), "{ty} dequantize");

            for m in 1..=9 {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
                let linear = GgmlLinear::new(ty, w.clone(), None, n, k).unwrap();
                let mut generic = vec![0.0; m * n];
                for (x, y) in x.chunks(k).zip(generic.chunks_mut(n)) {
                    row_gemv(&linear, x, y);
                }
                let scale = generic.iter().fold(1.0f32, |a, v| a.max(v.abs()));
                let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * scale;
                if m == 1 {
                    let mut fast = vec![f32::NAN; n];
                    kernel.gemv(ty, &w, row_bytes, &x, &mut fast);
                    for (j, (a, b)) in fast.iter().zip(&generic).enumerate() {
                        assert!(close(*a, *b), "{ty} gemv row {j}: {a} vs {b}");
                    }
                }
                // Rows 5..n of W, written to columns 5..n of out.
                let first = 5;
                let mut direct = vec![f32::NAN; m * n];
                // SAFETY: direct is m×n and this call alone uses it.
                unsafe {
                    kernel.direct(
                        ty,
                        &w[first * row_bytes..],
                        row_bytes,
                        &x,
                        m,
                        k,
                        direct.as_mut_ptr(),
                        n,
                        first,
                        n - first,
                    )
                };
                for (i, (a, b)) in direct.iter().zip(&generic).enumerate() {
                    if i % n >= first {
                        assert!(close(*a, *b), "{ty} direct m={m} element {i}: {a} vs {b}");
                    } else {
                        assert!(a.is_nan(), "{ty} direct m={m} wrote outside its columns");
                    }
                }
            }
        }
    }
}
