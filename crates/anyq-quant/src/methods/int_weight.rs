//! The integer weight of the methods that quantize activations too (W8A8, W4A8): int8 per
//! output channel or int4 per group, on the integer kernels of `anyq_core::cpu::int8`, and how
//! it is stored (`qweight`, `scales`).

use anyq_core::cpu::int8::{gemm_w4a8, gemm_w8a8, I4Weight, I8Weight};

use super::{check_scales, MethodError};
use crate::layer_arrays::{ArrayError, LayerArrays};
use crate::packing::{pack, unpack};
use crate::quantizer::{quantize, Granularity, QuantSpec};

pub enum IntWeight {
    W8(I8Weight),
    W4(I4Weight),
}

impl IntWeight {
    /// Quantizes `w` (`[n, k]`) symmetrically: 8 bits per output channel (`group = None`) or 4
    /// bits per group of `group` inputs.
    pub fn quantize(w: &[f32], n: usize, k: usize, group: Option<usize>) -> Result<Self, MethodError> {
        Ok(match group {
            None => {
                let q = quantize(w, n, k, &QuantSpec::new(8, true, Granularity::PerChannel))?;
                IntWeight::W8(I8Weight::new(&q.values, &q.scales, n, k))
            }
            Some(g) => {
                if g == 0 || !g.is_multiple_of(8) {
                    return Err(MethodError::Invalid {
                        name: format!("g{g}"),
                        message: "4-bit groups must be a positive multiple of 8".into(),
                    });
                }
                let q = quantize(w, n, k, &QuantSpec::new(4, true, Granularity::PerGroup(g)))?;
                IntWeight::W4(I4Weight::new(&q.values, &q.scales, n, k, g))
            }
        })
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
                let (g, scales) = (w.group(), w.scales());
                w.values().iter().enumerate().map(|(i, &v)| v as f32 * scales[i / g]).collect()
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

    /// `qweight` (int8 `[n, k]`, or int4 packed two per byte `[n, k/2]`) and `scales`
    /// (`[n, 1]` or `[n, k/group]`).
    pub fn save(&self, arrays: &mut LayerArrays) {
        match self {
            IntWeight::W8(w) => {
                arrays.put_i8("qweight", vec![w.n(), w.k()], w.values());
                arrays.put_f32("scales", vec![w.n(), 1], w.scales().to_vec());
            }
            IntWeight::W4(w) => {
                let packed = pack(&w.values(), 4).expect("int4 values fit 4 bits");
                arrays.put_u8("qweight", vec![w.n(), w.k() / 2], packed);
                arrays.put_f32("scales", vec![w.n(), w.k() / w.group()], w.scales());
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
                if !(k.is_multiple_of(g) && g.is_multiple_of(8)) {
                    return Err(MethodError::Invalid {
                        name: format!("g{g}"),
                        message: format!("groups of {g} do not fit {k} inputs"),
                    });
                }
                let packed = arrays.take_u8("qweight", &[n, k / 2])?;
                let q = unpack(&packed, 4, n * k).expect("the shape was checked");
                let scales = arrays.take_f32("scales", &[n, k / g])?;
                check_scales("scales", &scales)?;
                IntWeight::W4(I4Weight::new(&q, &scales, n, k, g))
            }
        })
    }
}
