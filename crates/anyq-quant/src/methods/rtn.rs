//! RTN (round to nearest), weight-only: each group of `g` weights of a row gets an asymmetric
//! min/max scale and zero point (or, for INT2 with bit balance, the symmetric grid
//! {−2, −1, 0, 1, 2}); activations stay f32. The baseline every other method is measured
//! against. Stored as dense-packed integers plus per-group scales and zero points; products
//! dequantize rows on the fly (`dequant_matmul`).

use std::cell::RefCell;

use anyq_core::cpu::add_bias;
use anyq_core::Linear;

use super::act_quant::ActQuantLinear;
use super::{check_scales, own_layer, LayerToQuantize, MethodError, QuantMethod};
use crate::dequant_matmul::{panel_gemm, row_gemv, RowDequantize};
use crate::layer_arrays::{ArrayError, LayerArrays};
use crate::packing::{pack, packed_len, unpack_into};
use crate::quantizer::{quantize, Granularity, QuantSpec, QuantizedMatrix, ScaleSearch};

pub const SYNTAX: &str = "rtn-w{2..8}a16[-g{group}][-bb] | rtn-w8a8 | rtn-w4a8-g{group}";

pub struct Rtn {
    spec: QuantSpec,
}

/// `rtn-w4a16-g128`: 4-bit weights in groups of 128; no `-g` = one group per output channel;
/// `-bb` = INT2 bit balance. `rtn-w8a8` / `rtn-w4a8-g64`: activations quantized per token too
/// (integer kernels), without SmoothQuant's smoothing or MixQ's outliers.
pub fn parse(name: &str) -> Result<Box<dyn QuantMethod>, MethodError> {
    let invalid = |message: &str| MethodError::Invalid { name: name.to_string(), message: message.to_string() };
    let rest = name.strip_prefix("rtn-w").ok_or_else(|| invalid(SYNTAX))?;
    if let Some((bits, rest)) = rest.split_once("a8") {
        let group = match rest.strip_prefix("-g") {
            Some(g) => Some(g.parse().map_err(|_| invalid("group size must be a number"))?),
            None if rest.is_empty() => None,
            None => return Err(invalid(&format!("expected {SYNTAX}"))),
        };
        return match (bits, group) {
            ("8", None) | ("4", Some(_)) => Ok(Box::new(RtnA8 { group })),
            _ => Err(invalid("8-bit activations go with 8-bit weights per channel or 4-bit weights in groups")),
        };
    }
    let (bits, rest) = rest.split_once("a16").ok_or_else(|| invalid(&format!("expected {SYNTAX}")))?;
    let bits: u8 = bits.parse().map_err(|_| invalid("weight bits must be a number"))?;
    let mut granularity = Granularity::PerChannel;
    let mut bit_balance = false;
    for part in rest.split('-').filter(|p| !p.is_empty()) {
        if let Some(g) = part.strip_prefix('g') {
            granularity = Granularity::PerGroup(g.parse().map_err(|_| invalid("group size must be a number"))?);
        } else if part == "bb" {
            bit_balance = true;
        } else {
            return Err(invalid(&format!("unknown option {part:?}; expected {SYNTAX}")));
        }
    }
    let spec = QuantSpec { bits, symmetric: bit_balance, bit_balance, granularity, search: ScaleSearch::MinMax };
    spec.validate().map_err(|e| invalid(&e.to_string()))?;
    Ok(Box::new(Rtn { spec }))
}

/// W8A8 (per-channel weights) or W4A8 (grouped weights) with per-token int8 activations.
pub struct RtnA8 {
    group: Option<usize>,
}

impl QuantMethod for RtnA8 {
    fn name(&self) -> String {
        match self.group {
            None => "rtn-w8a8".into(),
            Some(g) => format!("rtn-w4a8-g{g}"),
        }
    }

    fn bits(&self) -> (u8, u8) {
        (if self.group.is_some() { 4 } else { 8 }, 8)
    }

    fn group_size(&self) -> Option<usize> {
        self.group
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<Box<dyn Linear>, MethodError> {
        let (n, k) = (layer.out_features, layer.in_features);
        Ok(Box::new(ActQuantLinear::new(layer.weight, n, k, self.group, None, layer.bias)?))
    }

    fn save(&self, layer: &dyn Linear) -> Result<LayerArrays, MethodError> {
        Ok(own_layer::<ActQuantLinear>(self, layer)?.save())
    }

    fn load(&self, arrays: LayerArrays, n: usize, k: usize) -> Result<Box<dyn Linear>, MethodError> {
        Ok(Box::new(ActQuantLinear::load(arrays, n, k, self.group, false)?))
    }
}

impl QuantMethod for Rtn {
    fn name(&self) -> String {
        let group = match self.spec.granularity {
            Granularity::PerGroup(g) => format!("-g{g}"),
            _ => String::new(),
        };
        format!("rtn-w{}a16{group}{}", self.spec.bits, if self.spec.bit_balance { "-bb" } else { "" })
    }

    fn bits(&self) -> (u8, u8) {
        (self.spec.bits, 16)
    }

    fn group_size(&self) -> Option<usize> {
        match self.spec.granularity {
            Granularity::PerGroup(g) => Some(g),
            _ => None,
        }
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<Box<dyn Linear>, MethodError> {
        let q = quantize(layer.weight, layer.out_features, layer.in_features, &self.spec)?;
        Ok(Box::new(self.layer_of(q, layer.bias)))
    }

    fn save(&self, layer: &dyn Linear) -> Result<LayerArrays, MethodError> {
        let l: &RtnLinear = own_layer(self, layer)?;
        let (n, groups) = (l.out_features, l.groups_per_row);
        let mut arrays = LayerArrays::new();
        arrays.put_u8("qweight", vec![n, l.row_bytes], l.packed.clone());
        arrays.put_f32("scales", vec![n, groups], l.scales.clone());
        if !l.zeros.is_empty() {
            arrays.put_i8("zeros", vec![n, groups], l.zeros.clone());
        }
        if let Some(bias) = &l.bias {
            arrays.put_f32("bias", vec![n], bias.clone());
        }
        Ok(arrays)
    }

    fn load(&self, mut arrays: LayerArrays, n: usize, k: usize) -> Result<Box<dyn Linear>, MethodError> {
        self.spec.validate()?;
        let groups = self.group_size().map_or(1, |g| k.div_ceil(g));
        let packed = arrays.take_u8("qweight", &[n, packed_len(k, self.spec.storage_bits())])?;
        let scales = arrays.take_f32("scales", &[n, groups])?;
        check_scales("scales", &scales)?;
        let zeros = if self.spec.symmetric {
            Vec::new()
        } else {
            let zeros = arrays.take_i8("zeros", &[n, groups])?;
            let range = self.spec.qmin()..=self.spec.qmax();
            if let Some(z) = zeros.iter().find(|&&z| !range.contains(&(z as i32))) {
                return Err(
                    ArrayError::Invalid { name: "zeros".into(), message: format!("{z} is outside {range:?}") }.into()
                );
            }
            zeros
        };
        let bias = arrays.take_f32_opt("bias", &[n])?;
        arrays.finish()?;
        Ok(Box::new(self.layer(packed, scales, zeros, bias, n, k)))
    }
}

impl Rtn {
    /// RTN's format with `spec` (weight-only, as `parse` would make it).
    pub(super) fn with_spec(spec: QuantSpec) -> Self {
        Self { spec }
    }

    pub(super) fn spec(&self) -> &QuantSpec {
        &self.spec
    }

    /// The stored layer of the quantized weight `q` (by RTN, or by GPTQ into the same format).
    pub(super) fn layer_of(&self, q: QuantizedMatrix, bias: Option<&[f32]>) -> RtnLinear {
        let (n, k, bits) = (q.rows, q.cols, self.spec.storage_bits());
        let mut packed = Vec::with_capacity(n * packed_len(k, bits));
        for row in q.values.chunks_exact(k.max(1)) {
            packed.extend(pack(row, bits).expect("quantized values fit their storage bits"));
        }
        // Zero points lie in [qmin, qmax] of at most 8 bits.
        let zeros = q.zeros.iter().map(|&z| z as i8).collect();
        self.layer(packed, q.scales, zeros, bias.map(<[f32]>::to_vec), n, k)
    }

    /// The layer from its stored parts (`packed` rows of `k` values, `[n, groups]` scales and,
    /// when asymmetric, zeros).
    fn layer(
        &self,
        packed: Vec<u8>,
        scales: Vec<f32>,
        zeros: Vec<i8>,
        bias: Option<Vec<f32>>,
        n: usize,
        k: usize,
    ) -> RtnLinear {
        let bits = self.spec.storage_bits();
        let groups_per_row = scales.len() / n.max(1);
        RtnLinear {
            group: self.group_size().unwrap_or(k),
            packed,
            bits,
            row_bytes: packed_len(k, bits),
            scales,
            zeros,
            groups_per_row,
            bias,
            out_features: n,
            in_features: k,
        }
    }
}

thread_local! {
    /// One row of unpacked integers, kept per thread.
    static ROW: RefCell<Vec<i8>> = const { RefCell::new(Vec::new()) };
}

/// A weight-only RTN layer: rows of dense-packed integers, `x̂ = s · (q − z)` per group.
pub struct RtnLinear {
    packed: Vec<u8>,
    bits: u8,
    row_bytes: usize,
    /// `[out_features, groups_per_row]`
    scales: Vec<f32>,
    /// Same shape as `scales`; empty when symmetric.
    zeros: Vec<i8>,
    groups_per_row: usize,
    /// Inputs per group (`in_features` per channel); the last group of a row may be shorter.
    group: usize,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl RowDequantize for RtnLinear {
    fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        let k = self.in_features;
        let group = self.group.max(1);
        ROW.with(|q| {
            let mut q = q.borrow_mut();
            q.resize(k, 0);
            for (r, out) in out.chunks_exact_mut(k).enumerate() {
                let row = first + r;
                let bytes = &self.packed[row * self.row_bytes..(row + 1) * self.row_bytes];
                unpack_into(bytes, self.bits, &mut q).expect("rows were packed with these bits");
                for (g, (out, q)) in out.chunks_mut(group).zip(q.chunks(group)).enumerate() {
                    let at = row * self.groups_per_row + g;
                    let (s, z) = (self.scales[at], self.zeros.get(at).map_or(0, |&z| z as i32));
                    for (o, &v) in out.iter_mut().zip(q) {
                        *o = s * (v as i32 - z) as f32;
                    }
                }
            }
        });
    }
}

impl Linear for RtnLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        if m == 1 {
            row_gemv(self, x, out);
        } else {
            panel_gemm(self, x, m, out);
        }
        if let Some(bias) = &self.bias {
            add_bias(out, bias);
        }
    }

    fn weight_bytes(&self) -> usize {
        self.packed.len() + 4 * self.scales.len() + self.zeros.len() + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }

    fn weight_row(&self, row: usize, out: &mut [f32]) {
        self.dequantize_rows(row, out);
    }

    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
