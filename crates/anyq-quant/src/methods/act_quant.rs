//! Linear layers whose activations are quantized too (W8A8, W4A8): per-token symmetric int8
//! activations times int8 weights (per-channel scales) or int4 weights (per-group scales) on
//! the integer kernels of `anyq_core::cpu::int8`. An optional per-input-channel smoothing
//! vector s (SmoothQuant) is folded into the weight, `W·diag(s)`, and divided out of x before
//! x is quantized.

use anyq_core::cpu::int8::{gemm_w4a8, gemm_w8a8, quantize_rows_i8, I4Weight, I8Weight};
use anyq_core::Linear;

use super::MethodError;
use crate::quantizer::{quantize, Granularity, QuantSpec};

enum IntWeight {
    W8(I8Weight),
    W4(I4Weight),
}

pub struct ActQuantLinear {
    weight: IntWeight,
    /// `1 / s_j`, applied to x before quantization.
    inv_smooth: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl ActQuantLinear {
    /// Quantizes `w` (`[n, k]`) symmetrically: 8 bits per output channel (`group = None`) or 4
    /// bits per group of `group` inputs; `smooth` (`[k]`) scales input channels first.
    pub fn new(
        w: &[f32],
        n: usize,
        k: usize,
        group: Option<usize>,
        smooth: Option<&[f32]>,
        bias: Option<&[f32]>,
    ) -> Result<Self, MethodError> {
        let smoothed: Vec<f32>;
        let w = match smooth {
            Some(s) => {
                smoothed = w.chunks_exact(k).flat_map(|row| row.iter().zip(s).map(|(v, s)| v * s)).collect();
                &smoothed
            }
            None => w,
        };
        let weight = match group {
            None => {
                let q = quantize(w, n, k, &QuantSpec::new(8, true, Granularity::PerChannel))?;
                IntWeight::W8(I8Weight::new(&q.values, &q.scales, n, k))
            }
            Some(g) => {
                if g % 8 != 0 {
                    return Err(MethodError::Invalid {
                        name: format!("g{g}"),
                        message: "4-bit groups must be a multiple of 8".into(),
                    });
                }
                let q = quantize(w, n, k, &QuantSpec::new(4, true, Granularity::PerGroup(g)))?;
                IntWeight::W4(I4Weight::new(&q.values, &q.scales, n, k, g))
            }
        };
        Ok(Self {
            weight,
            inv_smooth: smooth.map(|s| s.iter().map(|v| 1.0 / v).collect()),
            bias: bias.map(<[f32]>::to_vec),
            out_features: n,
            in_features: k,
        })
    }
}

impl Linear for ActQuantLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let k = self.in_features;
        let smoothed: Vec<f32>;
        let x = match &self.inv_smooth {
            Some(inv) => {
                smoothed = x.chunks_exact(k).flat_map(|row| row.iter().zip(inv).map(|(v, i)| v * i)).collect();
                &smoothed
            }
            None => x,
        };
        let mut x_q = vec![0i8; m * k];
        let mut x_scales = vec![0.0f32; m];
        quantize_rows_i8(x, m, k, &mut x_q, &mut x_scales);
        let bias = self.bias.as_deref();
        match &self.weight {
            IntWeight::W8(w) => gemm_w8a8(&x_q, &x_scales, w, bias, out, m, false),
            IntWeight::W4(w) => gemm_w4a8(&x_q, &x_scales, w, bias, out, m, false),
        }
    }

    fn weight_bytes(&self) -> usize {
        let w = match &self.weight {
            IntWeight::W8(w) => w.bytes(),
            IntWeight::W4(w) => w.bytes(),
        };
        w + 4 * (self.inv_smooth.as_ref().map_or(0, Vec::len) + self.bias.as_ref().map_or(0, Vec::len))
    }

    fn weight_row(&self, row: usize, out: &mut [f32]) {
        let k = self.in_features;
        out.copy_from_slice(&self.dense_weight()[row * k..(row + 1) * k]);
    }

    /// The weight in the space of the layer's input: `ŵ / s` per input channel.
    fn dense_weight(&self) -> Vec<f32> {
        let k = self.in_features;
        let mut w: Vec<f32> = match &self.weight {
            IntWeight::W8(w) => {
                let scales = w.scales();
                w.values()
                    .chunks_exact(k)
                    .zip(scales)
                    .flat_map(|(row, s)| row.iter().map(move |&v| v as f32 * s))
                    .collect()
            }
            IntWeight::W4(w) => {
                let (g, scales) = (w.group(), w.scales());
                w.values().iter().enumerate().map(|(i, &v)| v as f32 * scales[i / g]).collect()
            }
        };
        if let Some(inv) = &self.inv_smooth {
            for row in w.chunks_exact_mut(k) {
                row.iter_mut().zip(inv).for_each(|(v, i)| *v *= i);
            }
        }
        w
    }

    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
