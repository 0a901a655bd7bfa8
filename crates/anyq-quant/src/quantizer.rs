//! The integer quantizer every method builds on (RTN, SmoothQuant, MixQ, GPTQ, AWQ, ABQ-LLM).
//!
//! Affine quantization of a row-major `[rows, cols]` matrix, one `(scale, zero)` pair per group:
//! `q = clamp(round(x / s) + z, qmin, qmax)` and `x̂ = s · (q − z)`, with round half to even as
//! PyTorch's `torch.round`, so results match the reference implementations.
//!
//! Integer ranges, for `b` bits:
//! - symmetric (`z = 0`): `[−(2^(b−1) − 1), 2^(b−1) − 1]`, a grid symmetric about zero that keeps
//!   int8 products away from the `−128 · −128` overflow path;
//! - bit-balanced INT2 (ABQ-LLM): the symmetric 5-level grid `{−2, …, 2}`, stored in 3 bits;
//! - asymmetric: the `2^b` codes `[0, 2^b − 1]`, **stored shifted by `−2^(b−1)`** so that every
//!   code fits an `i8` (INT8's 255 included): `qmin() = −2^(b−1)`, `qmax() = 2^(b−1) − 1`, and the
//!   zero point is shifted alike, so the formulas above hold unchanged on the stored values. The
//!   conventional unsigned code and zero point are `q + unsigned_offset()` and
//!   `z + unsigned_offset()`. The range always includes 0 (as GPTQ's), so `z ∈ [qmin, qmax]` and
//!   0.0 is exact.
//!
//! Groups are contiguous runs of the row-major data: the whole tensor, one row (per output
//! channel of a weight, or per token of an activation matrix), or `g` consecutive elements of a
//! row. `g` need not divide the columns: each row then ends in a shorter group of
//! `cols − g·⌊cols/g⌋` elements (SmolLM2's 576 inputs in groups of 128 are 4 × 128 + 64), so a
//! `[rows, cols]` matrix has `rows · ⌈cols/g⌉` groups.

use rayon::prelude::*;

/// Groups at least this long compute their own statistics and clip search in parallel; shorter
/// ones are parallel across groups instead.
const PARALLEL_GROUP_LEN: usize = 1 << 15;
/// Elements per parallel task when mapping values through their group's parameters.
const MAP_CHUNK: usize = 1 << 14;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error("bit width {bits} is outside 2..=8")]
    InvalidBits { bits: u8 },
    #[error("bit balance needs symmetric INT2, got {bits} bits, symmetric = {symmetric}")]
    BitBalanceNeedsSymmetricInt2 { bits: u8, symmetric: bool },
    #[error("group size must be positive")]
    ZeroGroupSize,
    #[error("clip search needs at least one step")]
    ZeroSearchSteps,
    #[error("clip search min_ratio {min_ratio} is outside (0, 1]")]
    InvalidMinRatio { min_ratio: f32 },
    #[error("{len} values do not make a [{rows}, {cols}] matrix")]
    ShapeMismatch { rows: usize, cols: usize, len: usize },
    #[error("non-finite value {value} at row {row}, column {col}")]
    NonFinite { row: usize, col: usize, value: f32 },
}

/// Which elements share one `(scale, zero)` pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    PerTensor,
    /// One pair per row: per output channel of a `[out, in]` weight, or per token of a
    /// `[tokens, features]` activation matrix.
    PerChannel,
    /// `g` consecutive elements along each row, the last group of a row shorter when `g` does not
    /// divide the columns.
    PerGroup(usize),
}

/// How each group's clipping range is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleSearch {
    /// The group's full range: nothing is clipped.
    MinMax,
    /// Try the range shrunk by `steps` ratios evenly spaced from 1.0 down to `min_ratio` and keep
    /// the one with the least squared error (the AWQ/GPTQ "mse" search). Ratio 1.0 is always
    /// tried, so the error is never above `MinMax`'s.
    Mse { steps: usize, min_ratio: f32 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantSpec {
    pub bits: u8,
    pub symmetric: bool,
    /// ABQ-LLM's INT2 grid `{−2, …, 2}`; only with `bits = 2` and `symmetric`.
    pub bit_balance: bool,
    pub granularity: Granularity,
    pub search: ScaleSearch,
}

/// The quantization parameters of one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    /// Always finite, positive and normal.
    pub scale: f32,
    /// 0 when symmetric; in the stored (shifted) domain when asymmetric.
    pub zero: i32,
}

impl GroupParams {
    /// `s · (q − z)`.
    #[inline]
    pub fn dequantize(self, q: i8) -> f32 {
        self.scale * (q as i32 - self.zero) as f32
    }
}

impl QuantSpec {
    /// A plain spec: no bit balance, min/max scales.
    pub fn new(bits: u8, symmetric: bool, granularity: Granularity) -> Self {
        Self { bits, symmetric, bit_balance: false, granularity, search: ScaleSearch::MinMax }
    }

    /// Checks the spec; it then fits a matrix of any shape.
    pub fn validate(&self) -> Result<(), QuantError> {
        self.validate_format()?;
        if self.granularity == Granularity::PerGroup(0) {
            return Err(QuantError::ZeroGroupSize);
        }
        Ok(())
    }

    /// Everything but the granularity, which only a shape can check.
    fn validate_format(&self) -> Result<(), QuantError> {
        if !(2..=8).contains(&self.bits) {
            return Err(QuantError::InvalidBits { bits: self.bits });
        }
        if self.bit_balance && (self.bits != 2 || !self.symmetric) {
            return Err(QuantError::BitBalanceNeedsSymmetricInt2 { bits: self.bits, symmetric: self.symmetric });
        }
        if let ScaleSearch::Mse { steps, min_ratio } = self.search {
            if steps == 0 {
                return Err(QuantError::ZeroSearchSteps);
            }
            // Written so that NaN fails too.
            if !(min_ratio > 0.0 && min_ratio <= 1.0) {
                return Err(QuantError::InvalidMinRatio { min_ratio });
            }
        }
        Ok(())
    }

    /// The smallest stored value (see the module doc for the asymmetric shift).
    pub fn qmin(&self) -> i32 {
        if self.symmetric {
            -self.qmax()
        } else {
            -(1 << (self.bits - 1))
        }
    }

    /// The largest stored value.
    pub fn qmax(&self) -> i32 {
        if self.bit_balance {
            2
        } else {
            (1 << (self.bits - 1)) - 1
        }
    }

    /// How many distinct values the grid has.
    pub fn levels(&self) -> u32 {
        (self.qmax() - self.qmin() + 1) as u32
    }

    /// Bits per stored value: `bits`, or 3 for bit-balanced INT2.
    pub fn storage_bits(&self) -> u8 {
        if self.bit_balance {
            3
        } else {
            self.bits
        }
    }

    /// What to add to stored asymmetric values and zero points to get the conventional unsigned
    /// ones in `[0, 2^b − 1]`: `2^(b−1)`; 0 when symmetric.
    pub fn unsigned_offset(&self) -> i32 {
        if self.symmetric {
            0
        } else {
            1 << (self.bits - 1)
        }
    }

    /// `clamp(round(x / s) + z, qmin, qmax)`.
    #[inline]
    pub fn quantize_value(&self, x: f32, params: GroupParams) -> i8 {
        // Clamping in f32 before the cast keeps far-out values from wrapping or overflowing.
        ((x / params.scale).round_ties_even() + params.zero as f32).clamp(self.qmin() as f32, self.qmax() as f32) as i8
    }

    /// The parameters for one group of values, by this spec's bits, symmetry and search (its
    /// granularity is not used: `group` is the group). For methods that quantize group by group
    /// themselves, as GPTQ does. A non-finite value is reported at row 0, column = its index.
    pub fn group_params(&self, group: &[f32]) -> Result<GroupParams, QuantError> {
        self.validate_format()?;
        if let Some(col) = group.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite { row: 0, col, value: group[col] });
        }
        Ok(self.params_of_finite(group))
    }

    /// The parameters covering `[lo, hi]` (widened to include 0).
    fn params_for_range(&self, lo: f32, hi: f32) -> GroupParams {
        let (qmin, qmax) = (self.qmin(), self.qmax());
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        if self.symmetric {
            let abs_max = hi.max(-lo);
            if abs_max == 0.0 {
                return GroupParams { scale: 1.0, zero: 0 };
            }
            GroupParams { scale: positive_scale(abs_max as f64 / qmax as f64), zero: 0 }
        } else {
            if hi == lo {
                // All zeros: any scale reproduces them; 1.0 survives any later storage format.
                return GroupParams { scale: 1.0, zero: qmin };
            }
            // In f64 so that the span of two extreme f32s cannot overflow.
            let exact_scale = (hi as f64 - lo as f64) / (qmax - qmin) as f64;
            let zero_for = |scale: f32| {
                let zero = qmin as f64 - (lo as f64 / scale as f64).round_ties_even();
                zero.clamp(qmin as f64, qmax as f64) as i32
            };
            let scale = positive_scale(exact_scale);
            let first = GroupParams { scale, zero: zero_for(scale) };
            if exact_scale < f32::MIN_POSITIVE as f64 {
                return first;
            }
            // Rounding the scale to f32 can leave the range a hair wider than the grid, and then
            // one end lands a code short of qmin or qmax. Quantizing the dequantized values would
            // then see a narrower range and pick a new grid. Nudging the scale down a few ulps
            // (at most 4 · 255 · 2^-23 of a step more error at the ends) finds a grid whose ends
            // are the range's codes, so that quantization is idempotent.
            let mut scale = scale;
            for _ in 0..4 {
                let zero = zero_for(scale);
                for zero in [zero, zero + 1, zero - 1] {
                    let params = GroupParams { scale, zero: zero.clamp(qmin, qmax) };
                    let ends = (self.quantize_value(lo, params) as i32, self.quantize_value(hi, params) as i32);
                    if ends == (qmin, qmax) {
                        return params;
                    }
                }
                let next_down = f32::from_bits(scale.to_bits() - 1);
                if next_down < f32::MIN_POSITIVE {
                    break;
                }
                scale = next_down;
            }
            first
        }
    }

    /// `params_for_range` with the range chosen by the search; `group` must be finite.
    fn params_of_finite(&self, group: &[f32]) -> GroupParams {
        let min_max = |(lo, hi): (f32, f32), &x: &f32| (lo.min(x), hi.max(x));
        let (lo, hi) = if group.len() >= PARALLEL_GROUP_LEN {
            group.par_iter().fold(|| (0.0, 0.0), min_max).reduce(|| (0.0, 0.0), |a, b| (a.0.min(b.0), a.1.max(b.1)))
        } else {
            group.iter().fold((0.0, 0.0), min_max)
        };
        match self.search {
            ScaleSearch::MinMax => self.params_for_range(lo, hi),
            ScaleSearch::Mse { steps, min_ratio } => {
                let candidate = |step: usize| {
                    let ratio = clip_ratio(step, steps, min_ratio);
                    let params = self.params_for_range(ratio * lo, ratio * hi);
                    (self.squared_error(group, params), params)
                };
                // The first of equal errors wins, so ties keep the wider range and the result does
                // not depend on the thread count.
                let first_least = |best: (f64, GroupParams), next: (f64, GroupParams)| {
                    if next.0 < best.0 {
                        next
                    } else {
                        best
                    }
                };
                if group.len() >= PARALLEL_GROUP_LEN {
                    let errors: Vec<_> = (0..steps).into_par_iter().map(candidate).collect();
                    errors.into_iter().reduce(first_least)
                } else {
                    (0..steps).map(candidate).reduce(first_least)
                }
                .map_or_else(|| self.params_for_range(lo, hi), |(_, params)| params)
            }
        }
    }

    /// Σ (x − x̂)², accumulated in f64.
    fn squared_error(&self, group: &[f32], params: GroupParams) -> f64 {
        group
            .iter()
            .map(|&x| {
                let diff = (x - params.dequantize(self.quantize_value(x, params))) as f64;
                diff * diff
            })
            .sum()
    }

    /// The groups of a `[rows, cols]` matrix; the spec is valid.
    fn group_layout(&self, rows: usize, cols: usize) -> GroupLayout {
        let (segments, segment_len, group_len) = match self.granularity {
            Granularity::PerTensor => (1, rows * cols, rows * cols),
            Granularity::PerChannel => (rows, cols, cols),
            Granularity::PerGroup(group_size) => (rows, cols, group_size),
        };
        // An empty row still has its (per channel) group; per group it has none.
        let per_segment = if group_len == 0 { 1 } else { segment_len.div_ceil(group_len) };
        GroupLayout { segment_len, group_len, per_segment, groups: segments * per_segment }
    }

    /// Validates everything and computes every group's parameters.
    fn matrix_params(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<(Vec<GroupParams>, GroupLayout), QuantError> {
        self.validate()?;
        if rows.checked_mul(cols) != Some(x.len()) {
            return Err(QuantError::ShapeMismatch { rows, cols, len: x.len() });
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite { row: i / cols, col: i % cols, value: x[i] });
        }
        let layout = self.group_layout(rows, cols);
        let params = (0..layout.groups).into_par_iter().map(|g| self.params_of_finite(&x[layout.range(g)])).collect();
        Ok((params, layout))
    }
}

/// How a matrix splits into groups: `groups / per_segment` segments (the whole tensor, or each
/// row) of `segment_len` elements, each cut into `per_segment` runs of `group_len`, the last
/// run of a segment shorter when `group_len` does not divide `segment_len`.
#[derive(Clone, Copy, Debug)]
struct GroupLayout {
    segment_len: usize,
    group_len: usize,
    per_segment: usize,
    groups: usize,
}

impl GroupLayout {
    /// The elements of group `g` (`g < groups`).
    fn range(&self, g: usize) -> std::ops::Range<usize> {
        let (segment, j) = (g / self.per_segment, g % self.per_segment);
        let start = segment * self.segment_len + j * self.group_len;
        start..(start + self.group_len).min((segment + 1) * self.segment_len)
    }

    /// The group of element `i` (an element exists, so both lengths are positive).
    fn group_of(&self, i: usize) -> usize {
        i / self.segment_len * self.per_segment + i % self.segment_len / self.group_len
    }
}

/// A quantized `[rows, cols]` matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub spec: QuantSpec,
    /// Row-major, each in `[spec.qmin(), spec.qmax()]` (asymmetric values shifted: see the
    /// module doc).
    pub values: Vec<i8>,
    /// One per group, in row-major group order: `[rows, ⌈cols/g⌉]` per group, `[rows]` per
    /// channel, a single one per tensor.
    pub scales: Vec<f32>,
    /// Zero points, shaped as `scales`; empty when symmetric.
    pub zeros: Vec<i32>,
}

impl QuantizedMatrix {
    pub fn dequantize(&self) -> Vec<f32> {
        let params: Vec<GroupParams> = (0..self.scales.len()).map(|g| self.params_at(g)).collect();
        let mut out = vec![0.0; self.values.len()];
        let layout = self.spec.group_layout(self.rows, self.cols);
        map_by_group(&self.values, layout, &params, &mut out, |q, params| params.dequantize(q));
        out
    }

    /// The scale of the element at (`row`, `col`); panics outside the matrix, as indexing does.
    pub fn scale_of(&self, row: usize, col: usize) -> f32 {
        self.scales[self.group_of(row, col)]
    }

    /// The (stored-domain) zero point of the element at (`row`, `col`); 0 when symmetric.
    pub fn zero_of(&self, row: usize, col: usize) -> i32 {
        self.params_at(self.group_of(row, col)).zero
    }

    fn params_at(&self, group: usize) -> GroupParams {
        GroupParams { scale: self.scales[group], zero: self.zeros.get(group).copied().unwrap_or(0) }
    }

    fn group_of(&self, row: usize, col: usize) -> usize {
        assert!(row < self.rows && col < self.cols, "({row}, {col}) is outside [{}, {}]", self.rows, self.cols);
        match self.spec.granularity {
            Granularity::PerTensor => 0,
            Granularity::PerChannel => row,
            Granularity::PerGroup(group_size) => row * self.cols.div_ceil(group_size) + col / group_size,
        }
    }
}

/// Quantizes the row-major `[rows, cols]` matrix `x`.
pub fn quantize(x: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> Result<QuantizedMatrix, QuantError> {
    let (params, layout) = spec.matrix_params(x, rows, cols)?;
    let mut values = vec![0; x.len()];
    map_by_group(x, layout, &params, &mut values, |x, params| spec.quantize_value(x, params));
    let scales = params.iter().map(|p| p.scale).collect();
    let zeros = if spec.symmetric { Vec::new() } else { params.iter().map(|p| p.zero).collect() };
    Ok(QuantizedMatrix { rows, cols, spec: *spec, values, scales, zeros })
}

/// `quantize` then `dequantize` (bit for bit the same), without storing the integers: what
/// calibration searches measure.
pub fn fake_quantize(x: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> Result<Vec<f32>, QuantError> {
    let (params, layout) = spec.matrix_params(x, rows, cols)?;
    let mut out = vec![0.0; x.len()];
    map_by_group(x, layout, &params, &mut out, |x, params| params.dequantize(spec.quantize_value(x, params)));
    Ok(out)
}

/// `out[i] = f(input[i], params[group of i])`, in parallel over fixed-size chunks so that a
/// single huge group (per tensor) is split too.
fn map_by_group<I: Copy + Sync, O: Send>(
    input: &[I],
    layout: GroupLayout,
    params: &[GroupParams],
    out: &mut [O],
    f: impl Fn(I, GroupParams) -> O + Sync,
) {
    out.par_chunks_mut(MAP_CHUNK).zip(input.par_chunks(MAP_CHUNK)).enumerate().for_each(|(chunk, (out, input))| {
        let base = chunk * MAP_CHUNK;
        let mut start = 0;
        while start < out.len() {
            let group = layout.group_of(base + start);
            let end = (layout.range(group).end - base).min(out.len());
            let params = params[group];
            for (o, &v) in out[start..end].iter_mut().zip(&input[start..end]) {
                *o = f(v, params);
            }
            start = end;
        }
    });
}

/// The `step`-th of `steps` ratios evenly spaced from 1.0 (step 0, exactly) to `min_ratio`.
fn clip_ratio(step: usize, steps: usize, min_ratio: f32) -> f32 {
    if steps <= 1 {
        return 1.0;
    }
    1.0 - (1.0 - min_ratio) * step as f32 / (steps - 1) as f32
}

/// A scale from a positive span, kept a normal float so that `x / s` never divides by zero.
fn positive_scale(scale: f64) -> f32 {
    (scale as f32).max(f32::MIN_POSITIVE)
}
