//! The integer weight of the methods that quantize activations too (W8A8, W4A8): int8 per
//! output channel or int4 per group with zero points, on the integer kernels of
//! `anyq_core::cpu::int8`, and how it is stored (`qweight`, `scales`, `zeros`).

use anyq_core::cpu::int8::{gemm_w4a8, gemm_w8a8, I4Weight, I8Weight};

use super::{check_scales, MethodError};
use crate::layer_arrays::{ArrayError, LayerArrays};
use crate::packing::{pack, unpack};
use crate::quantizer::{quantize, Granularity, QuantSpec, QuantizedMatrix};

/// How int4 weights are quantized: asymmetric min/max per group. Of symmetric or asymmetric,
/// min/max or MSE-searched clipping, it gave SmolLM2 the lowest perplexity in every W4A8 method
/// measured (the 16 asymmetric levels use the whole grid; clipping cuts off weights that matter).
pub fn w4_spec(group: usize) -> QuantSpec {
    QuantSpec::new(4, false, Granularity::PerGroup(group))
}

pub enum IntWeight {
    W8(I8Weight),
    W4(I4Weight),
}

impl IntWeight {
    /// How weights are quantized: 8 bits symmetric per output channel (`group = None`), or 4
    /// bits per group of `group` inputs by `w4_spec`, the last group of a row shorter when
    /// `group` does not divide k.
    pub fn spec(k: usize, group: Option<usize>) -> Result<QuantSpec, MethodError> {
        match group {
            None => Ok(QuantSpec::new(8, true, Granularity::PerChannel)),
            Some(g) => check_w4_shape(k, g).map(|()| w4_spec(g)),
        }
    }

    /// Quantizes `w` (`[n, k]`) by `spec`.
    pub fn quantize(w: &[f32], n: usize, k: usize, group: Option<usize>) -> Result<Self, MethodError> {
        let q = quantize(w, n, k, &Self::spec(k, group)?)?;
        Ok(Self::from_quantized(&q))
    }

    /// The weight of `q`, quantized by `spec` (by RTN, or by GPTQ).
    pub fn from_quantized(q: &QuantizedMatrix) -> Self {
        let (n, k) = (q.rows, q.cols);
        match q.spec.granularity {
            Granularity::PerGroup(g) => {
                // Asymmetric zero points lie in [-8, 7], as the values.
                let zeros: Option<Vec<i8>> = (!q.spec.symmetric).then(|| q.zeros.iter().map(|&z| z as i8).collect());
                IntWeight::W4(I4Weight::new(&q.values, &q.scales, zeros.as_deref(), n, k, g))
            }
            _ => IntWeight::W8(I8Weight::new(&q.values, &q.scales, n, k)),
        }
    }

    /// The dequantized weight `[n, k]`.
    pub fn dequantize(&self, k: usize) -> Vec<f32> {
        match self {
            IntWeight::W8(w) => w
                .values()
                .chunks_exact(k.max(1))
                .zip(w.scales())
                .flat_map(|(row, s)| row.iter().map(move |&v| v as f32 * s))
                .collect(),
            IntWeight::W4(w) => {
                let (k, g, groups) = (w.k(), w.group(), w.groups());
                let (scales, zeros) = (w.scales(), w.zeros());
                let values = w.values();
                values
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let at = i / k * groups + i % k / g;
                        scales[at] * (v as i32 - zeros.as_ref().map_or(0, |z| z[at] as i32)) as f32
                    })
                    .collect()
            }
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            IntWeight::W8(w) => w.bytes(),
            IntWeight::W4(w) => w.bytes(),
        }
    }

    /// `out = x_q·Wᵀ` scaled (`+= ` with `accumulate`), plus `bias`.
    pub fn gemm(
        &self,
        x_q: &[i8],
        x_scales: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        m: usize,
        accumulate: bool,
    ) {
        match self {
            IntWeight::W8(w) => gemm_w8a8(x_q, x_scales, w, bias, out, m, accumulate),
            IntWeight::W4(w) => gemm_w4a8(x_q, x_scales, w, bias, out, m, accumulate),
        }
    }

    /// `qweight` (int8 `[n, k]`, or int4 packed two per byte `[n, k/2]`), `scales` (`[n, 1]` or
    /// `[n, ⌈k/group⌉]`) and, for asymmetric int4, `zeros` (as `scales`, in [-8, 7]).
    pub fn save(&self, arrays: &mut LayerArrays) {
        match self {
            IntWeight::W8(w) => {
                arrays.put_i8("qweight", vec![w.n(), w.k()], w.values());
                arrays.put_f32("scales", vec![w.n(), 1], w.scales().to_vec());
            }
            IntWeight::W4(w) => {
                let packed = pack(&w.values(), 4).expect("int4 values fit 4 bits");
                arrays.put_u8("qweight", vec![w.n(), w.k() / 2], packed);
                arrays.put_f32("scales", vec![w.n(), w.groups()], w.scales());
                if let Some(zeros) = w.zeros() {
                    arrays.put_i8("zeros", vec![w.n(), w.groups()], zeros);
                }
            }
        }
    }

    /// The weight `save` wrote, for `[n, k]` and the method's `group`.
    pub fn load(arrays: &mut LayerArrays, n: usize, k: usize, group: Option<usize>) -> Result<Self, MethodError> {
        Ok(match group {
            None => {
                let q = arrays.take_i8("qweight", &[n, k])?;
                if q.contains(&i8::MIN) {
                    return Err(ArrayError::Invalid {
                        name: "qweight".into(),
                        message: "-128 is outside [-127, 127]".into(),
                    }
                    .into());
                }
                let scales = arrays.take_f32("scales", &[n, 1])?;
                check_scales("scales", &scales)?;
                IntWeight::W8(I8Weight::new(&q, &scales, n, k))
            }
            Some(g) => {
                check_w4_shape(k, g)?;
                let packed = arrays.take_u8("qweight", &[n, k / 2])?;
                let q = unpack(&packed, 4, n * k).expect("the shape was checked");
                let groups = k.div_ceil(g);
                let scales = arrays.take_f32("scales", &[n, groups])?;
                check_scales("scales", &scales)?;
                let zeros = match w4_spec(g).symmetric {
                    true => None,
                    false => Some(arrays.take_i8("zeros", &[n, groups])?),
                };
                if let Some(z) = zeros.iter().flatten().find(|z| !(-8..=7).contains(*z)) {
                    let message = format!("{z} is outside [-8, 7]");
                    return Err(ArrayError::Invalid { name: "zeros".into(), message }.into());
                }
                IntWeight::W4(I4Weight::new(&q, &scales, zeros.as_deref(), n, k, g))
            }
        })
    }
}

/// The int4 kernels take k and the group size in multiples of 8; the last group may be shorter.
fn check_w4_shape(k: usize, group: usize) -> Result<(), MethodError> {
    if group == 0 || !group.is_multiple_of(8) || !k.is_multiple_of(8) {
        return Err(MethodError::Invalid {
            name: format!("g{group}"),
            message: format!("4-bit weights need the group size ({group}) and the inputs ({k}) in multiples of 8"),
        });
    }
    Ok(())
}
