//! llama.cpp's GGML tensor formats, dequantized to `f32`.
//!
//! Each block function follows ggml's reference `dequantize_row_*` step by step, in the same
//! order of float operations, so results match llama.cpp's bit for bit.

use std::fmt;

use half::f16;
use rayon::prelude::*;

/// Elements per block of the legacy formats (Q4_0 … Q8_0).
const QK: usize = 32;
/// Elements per super-block of the K-quants.
const QK_K: usize = 256;

/// Tensors smaller than this are dequantized on the calling thread: below it, handing work to
/// other threads costs more than it saves.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;
/// Elements per parallel task: enough to amortise scheduling, small enough to balance load.
const CHUNK_ELEMENTS: usize = 1 << 14;

/// A tensor element format. Variants are in the order of the table of formats, which is
/// indexed by them.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GgmlError {
    #[error("{ty}: {n_elements} elements is not a multiple of the block size {block_size}")]
    NotBlockMultiple { ty: GgmlType, n_elements: usize, block_size: usize },
    #[error("{ty}: {n_elements} elements take more bytes than a usize can count")]
    TooLarge { ty: GgmlType, n_elements: usize },
    #[error("{ty}: expected {expected} bytes for {n_elements} elements, got {got}")]
    LengthMismatch { ty: GgmlType, n_elements: usize, expected: usize, got: usize },
}

/// One row of the table of formats (llama.cpp's `type_traits`).
struct Format {
    ty: GgmlType,
    /// The type id in GGUF files and ggml (`enum ggml_type`).
    id: u32,
    name: &'static str,
    /// Elements per block.
    block_size: usize,
    /// Bytes per block.
    type_size: usize,
    /// Dequantizes whole blocks: `src` holds `dst.len() / block_size` blocks.
    to_f32: fn(&[u8], &mut [f32]),
}

/// A table row. The block function's array types must have exactly `$bytes` and `$elems`
/// entries, so a size that disagrees with the function does not compile.
macro_rules! row {
    ($ty:ident, $id:expr, $elems:expr, $bytes:expr, $block:ident) => {
        Format {
            ty: GgmlType::$ty,
            id: $id,
            name: stringify!($ty),
            block_size: $elems,
            type_size: $bytes,
            to_f32: |src, dst| blocks::<{ $bytes }, { $elems }, _>(src, dst, $block),
        }
    };
}

/// The formats: adding one is one row here, one variant and one block function.
/// Sizes spell out the block layouts (f16 scales are 2 bytes).
const FORMATS: [Format; 14] = [
    row!(F32, 0, 1, 4, f32_block),
    row!(F16, 1, 1, 2, f16_block),
    row!(BF16, 30, 1, 2, bf16_block),
    row!(Q4_0, 2, QK, 2 + QK / 2, q4_0),
    row!(Q4_1, 3, QK, 2 + 2 + QK / 2, q4_1),
    row!(Q5_0, 6, QK, 2 + 4 + QK / 2, q5_0),
    row!(Q5_1, 7, QK, 2 + 2 + 4 + QK / 2, q5_1),
    row!(Q8_0, 8, QK, 2 + QK, q8_0),
    row!(Q2_K, 10, QK_K, QK_K / 16 + QK_K / 4 + 2 + 2, q2_k),
    row!(Q3_K, 11, QK_K, QK_K / 8 + QK_K / 4 + 12 + 2, q3_k),
    row!(Q4_K, 12, QK_K, 2 + 2 + 12 + QK_K / 2, q4_k),
    row!(Q5_K, 13, QK_K, 2 + 2 + 12 + QK_K / 8 + QK_K / 2, q5_k),
    row!(Q6_K, 14, QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2, q6_k),
    row!(Q8_K, 15, QK_K, 4 + QK_K + 2 * QK_K / 16, q8_k),
];

// `GgmlType::format` indexes the table by variant: check the order at compile time.
const _: () = {
    let mut i = 0;
    while i < FORMATS.len() {
        assert!(FORMATS[i].ty as usize == i, "FORMATS is not in GgmlType order");
        i += 1;
    }
};

impl GgmlType {
    fn format(self) -> &'static Format {
        &FORMATS[self as usize]
    }

    /// The type with this GGUF/ggml id, if it is one we can read.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        FORMATS.iter().find(|f| f.id == id).map(|f| f.ty)
    }

    pub fn id(self) -> u32 {
        self.format().id
    }

    /// The type named `name` (`Q8_0`, `F16`, ...), as `name` spells it.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        FORMATS.iter().find(|f| f.name == name).map(|f| f.ty)
    }

    pub fn name(self) -> &'static str {
        self.format().name
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        self.format().block_size
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.format().type_size
    }

    /// Bytes that `n_elements` take in this format.
    pub fn bytes_for(self, n_elements: usize) -> Result<usize, GgmlError> {
        let f = self.format();
        if !n_elements.is_multiple_of(f.block_size) {
            return Err(GgmlError::NotBlockMultiple { ty: self, n_elements, block_size: f.block_size });
        }
        (n_elements / f.block_size).checked_mul(f.type_size).ok_or(GgmlError::TooLarge { ty: self, n_elements })
    }

    /// Dequantizes `src` into `dst`, whose length is the element count; large tensors are
    /// split over threads.
    pub fn dequantize(self, src: &[u8], dst: &mut [f32]) -> Result<(), GgmlError> {
        let expected = self.bytes_for(dst.len())?;
        if src.len() != expected {
            return Err(GgmlError::LengthMismatch { ty: self, n_elements: dst.len(), expected, got: src.len() });
        }
        let f = self.format();
        if dst.len() < PARALLEL_MIN_ELEMENTS {
            (f.to_f32)(src, dst);
        } else {
            let blocks_per_chunk = (CHUNK_ELEMENTS / f.block_size).max(1);
            src.par_chunks(blocks_per_chunk * f.type_size)
                .zip(dst.par_chunks_mut(blocks_per_chunk * f.block_size))
                .for_each(|(s, d)| (f.to_f32)(s, d));
        }
        Ok(())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs a block function over consecutive blocks. Fixed-size arrays let the block functions
/// index without bounds checks; the conversions cannot fail on exact chunks.
#[inline(always)]
fn blocks<const BYTES: usize, const ELEMS: usize, F>(src: &[u8], dst: &mut [f32], block: F)
where
    F: Fn(&[u8; BYTES], &mut [f32; ELEMS]),
{
    for (s, d) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(ELEMS)) {
        if let (Ok(s), Ok(d)) = (s.try_into(), d.try_into()) {
            block(s, d);
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn f32_block(b: &[u8; 4], y: &mut [f32; 1]) {
    y[0] = f32::from_le_bytes(*b);
}

fn f16_block(b: &[u8; 2], y: &mut [f32; 1]) {
    y[0] = f16_at(b, 0);
}

// bf16 is the top half of an f32. Shifting (as ggml does) keeps NaN payloads as they are,
// where `half::bf16::to_f32` would set the quiet bit.
fn bf16_block(b: &[u8; 2], y: &mut [f32; 1]) {
    y[0] = f32::from_bits((u16::from_le_bytes(*b) as u32) << 16);
}

// Legacy formats: element j in the low nibble of byte j, element j + 16 in its high nibble.

/// d: f16, qs: 16 bytes; x = d * (q - 8).
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..];
    for j in 0..QK / 2 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// d, m: f16, qs: 16 bytes; x = d * q + m.
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..];
    for j in 0..QK / 2 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// d: f16, qh: u32 (bit j is the fifth bit of element j), qs: 16 bytes; x = d * (q - 16).
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..];
    for j in 0..QK / 2 {
        let h0 = ((qh >> j) << 4) as u8 & 0x10;
        let h1 = (qh >> (j + 12)) as u8 & 0x10;
        y[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + QK / 2] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// d, m: f16, qh: u32, qs: 16 bytes; x = d * q + m.
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..];
    for j in 0..QK / 2 {
        let h0 = ((qh >> j) << 4) as u8 & 0x10;
        let h1 = (qh >> (j + 12)) as u8 & 0x10;
        y[j] = ((qs[j] & 0x0F) | h0) as f32 * d + m;
        y[j + QK / 2] = ((qs[j] >> 4) | h1) as f32 * d + m;
    }
}

/// d: f16, qs: 32 i8; x = q * d.
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..QK {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

// K-quants: 256-element super-blocks of 16 or 32-element sub-blocks, each with its own small
// integer scale (and min) that multiplies the super-block's f16 scale.

/// scales: 16 bytes (low nibble scale, high nibble min), qs: 64 bytes of 2-bit values,
/// d, dmin: f16. Byte l of each 32-byte group holds 4 elements 32 apart (shifts 0, 2, 4, 6).
fn q2_k(b: &[u8; 84], y: &mut [f32; 256]) {
    let scales = &b[..16];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut is = 0;
    let mut out = 0;
    for n in 0..QK_K / 128 {
        let q = &b[16 + 32 * n..16 + 32 * (n + 1)];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = min * (sc >> 4) as f32;
                for l in 0..16 {
                    y[out] = dl * ((q[16 * half + l] >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

/// hmask: 32 bytes (the third bit, set meaning "no -4 offset"), qs: 64 bytes of 2-bit values,
/// scales: 12 bytes of sixteen 6-bit scales, d: f16.
fn q3_k(b: &[u8; 110], y: &mut [f32; 256]) {
    let hm = &b[..32];
    let s = &b[96..108];
    let d_all = f16_at(b, 108);
    // Scale k: low 4 bits are nibbles of bytes 0..8 (k < 8 low nibble, else high nibble of
    // byte k - 8); high 2 bits are bit pairs of bytes 8..12 (byte 8 + k % 4, pair k / 4).
    let scale = |k: usize| {
        let lo = if k < 8 { s[k] & 0x0F } else { s[k - 8] >> 4 };
        let hi = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        (lo | (hi << 4)) as i32 - 32
    };
    let mut is = 0;
    let mut out = 0;
    let mut m = 1u8;
    for n in 0..QK_K / 128 {
        let q = &b[32 + 32 * n..32 + 32 * (n + 1)];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * scale(is) as f32;
                is += 1;
                for l in 16 * half..16 * (half + 1) {
                    let offset = if hm[l] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (((q[l] >> shift) & 3) as i32 - offset) as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// Scale and min of sub-block j from the 12-byte K-quant packing of eight 6-bit pairs:
/// bytes 0..4 hold scales 0..4 (low 6 bits), bytes 4..8 mins 0..4; for j >= 4 the low 4 bits
/// are the nibbles of bytes 8..12 and the high 2 bits are the spare top bits of bytes 0..8.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// d, dmin: f16, scales: 12 bytes, qs: 128 bytes; each 32-byte group is two 32-element
/// sub-blocks, low nibbles then high nibbles. x = d * sc * q - dmin * m.
fn q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    for g in 0..QK_K / 64 {
        let q = &b[16 + 32 * g..16 + 32 * (g + 1)];
        let (sc, m) = scale_min_k4(2 * g, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * g + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let y = &mut y[64 * g..64 * (g + 1)];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// d, dmin: f16, scales: 12 bytes, qh: 32 bytes (fifth bits: bit 2g and 2g + 1 of byte l
/// for group g's two sub-blocks), qs: 128 bytes as in Q4_K.
fn q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    for g in 0..QK_K / 64 {
        let ql = &b[48 + 32 * g..48 + 32 * (g + 1)];
        let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
        let (sc, m) = scale_min_k4(2 * g, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * g + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let y = &mut y[64 * g..64 * (g + 1)];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// ql: 128 bytes (low 4 bits), qh: 64 bytes (high 2 bits), scales: 16 i8, d: f16.
/// Per 128 elements: ql bytes l and l + 32 hold elements l, l + 32 (low nibbles) and l + 64,
/// l + 96 (high nibbles); qh byte l holds their high bits at shifts 0, 2, 4, 6.
fn q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let d = f16_at(b, 208);
    for n in 0..QK_K / 128 {
        let ql = &b[64 * n..64 * (n + 1)];
        let qh = &b[128 + 32 * n..128 + 32 * (n + 1)];
        let sc = &b[192 + 8 * n..192 + 8 * (n + 1)];
        let y = &mut y[128 * n..128 * (n + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// d: f32, qs: 256 i8, bsums: 16 i16 (sums of 16 values, only for dot products); x = d * q.
fn q8_k(b: &[u8; 292], y: &mut [f32; 256]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..QK_K {
        y[j] = d * b[4 + j] as i8 as f32;
    }
}
