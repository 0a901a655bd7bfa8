//! Linear layers whose activations are quantized too (W8A8, W4A8): per-token symmetric int8
//! activations times int8 weights (per-channel scales) or int4 weights (per-group scales and
//! zero points) on the integer kernels of `anyq_core::cpu::int8`. An optional per-input-channel
//! smoothing vector s (SmoothQuant) is folded into the weight, `W·diag(s)`, and divided out of x
//! before x is quantized.

use anyq_core::cpu::int8::quantize_rows_i8;
use anyq_core::Linear;

use super::int_weight::IntWeight;
use super::MethodError;
use crate::layer_arrays::LayerArrays;

pub struct ActQuantLinear {
    weight: IntWeight,
    /// `1 / s_j`, applied to x before quantization.
    inv_smooth: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl ActQuantLinear {
    /// Quantizes `w` (`[n, k]`) as `IntWeight::quantize` does (8 bits per output channel, or 4
    /// bits per group of `group` inputs); `smooth` (`[k]`) scales input channels first.
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
        let weight = IntWeight::quantize(w, n, k, group)?;
        Ok(Self {
            weight,
            inv_smooth: smooth.map(|s| s.iter().map(|v| 1.0 / v).collect()),
            bias: bias.map(<[f32]>::to_vec),
            out_features: n,
            in_features: k,
        })
    }
}

impl ActQuantLinear {
    /// `qweight`, `scales`, `smooth_inv` (`1/s`, where the layer smooths) and `bias`.
    pub fn save(&self) -> LayerArrays {
        let mut arrays = LayerArrays::new();
        self.weight.save(&mut arrays);
        if let Some(inv) = &self.inv_smooth {
            arrays.put_f32("smooth_inv", vec![self.in_features], inv.clone());
        }
        if let Some(bias) = &self.bias {
            arrays.put_f32("bias", vec![self.out_features], bias.clone());
        }
        arrays
    }

    /// The layer `save` wrote; `smoothed` says whether it must have smoothing factors.
    pub fn load(
        mut arrays: LayerArrays,
        n: usize,
        k: usize,
        group: Option<usize>,
        smoothed: bool,
    ) -> Result<Self, MethodError> {
        let weight = IntWeight::load(&mut arrays, n, k, group)?;
        let inv_smooth = match smoothed {
            true => {
                let inv = arrays.take_f32("smooth_inv", &[k])?;
                super::check_scales("smooth_inv", &inv)?;
                Some(inv)
            }
            false => None,
        };
        let bias = arrays.take_f32_opt("bias", &[n])?;
        arrays.finish()?;
        Ok(Self { weight, inv_smooth, bias, out_features: n, in_features: k })
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
        self.weight.gemm(&x_q, &x_scales, self.bias.as_deref(), out, m, false);
    }

    fn weight_bytes(&self) -> usize {
        self.weight.bytes()
            + 4 * (self.inv_smooth.as_ref().map_or(0, Vec::len) + self.bias.as_ref().map_or(0, Vec::len))
    }

    fn weight_row(&self, row: usize, out: &mut [f32]) {
        let k = self.in_features;
        out.copy_from_slice(&self.dense_weight()[row * k..(row + 1) * k]);
    }

    /// The weight in the space of the layer's input: `ŵ / s` per input channel.
    fn dense_weight(&self) -> Vec<f32> {
        let k = self.in_features;
        let mut w = self.weight.dequantize(k);
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
