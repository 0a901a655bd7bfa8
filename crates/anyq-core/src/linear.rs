//! The linear layer abstraction that every weight format implements: models call `forward`
//! and never learn how the weight is stored.

use crate::cpu::{add_bias, matmul_xwt, ActivationScan, ScanRequest};

/// `y[m, out] = x[m, in] · Wᵀ (+ b)`.
pub trait Linear: Send + Sync {
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// `x` is `[m, in_features]`, `out` is `[m, out_features]` and is overwritten.
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]);
    /// Bytes the stored weight occupies (what a decode step must read).
    fn weight_bytes(&self) -> usize;
    /// Row `row` of the weight (`[in_features]`) as f32: token embeddings read their table this
    /// way, so a tied output projection can share the same stored weight.
    fn weight_row(&self, row: usize, out: &mut [f32]);
    /// The bias added to every output row, if any.
    fn bias(&self) -> Option<&[f32]>;
    /// The concrete layer, for reports that read a method's own state (MixQ's outlier counters).
    fn as_any(&self) -> &dyn std::any::Any;

    /// A scan of its input that the layer would otherwise make itself (MixQ: amax outside its
    /// outlier channels), for the op that writes the input to compute in the same pass. Layers
    /// that read one input and ask equal requests can share one scan. The default asks nothing.
    fn input_scan(&self) -> Option<ScanRequest> {
        None
    }

    /// `forward` given `scan`, the scan of `x` for a request that `input_scan` returned (earlier
    /// in this call's forward pass). The default does not need it.
    fn forward_scanned(&self, x: &[f32], m: usize, scan: &ActivationScan, out: &mut [f32]) {
        let _ = scan;
        self.forward(x, m, out);
    }

    /// The whole weight `[out_features, in_features]` as f32 (what quantization methods start from).
    fn dense_weight(&self) -> Vec<f32> {
        let k = self.in_features();
        let mut w = vec![0.0; self.out_features() * k];
        for (r, row) in w.chunks_exact_mut(k.max(1)).enumerate() {
            self.weight_row(r, row);
        }
        w
    }
}

/// A full-precision weight `[out, in]` with an optional bias.
#[derive(Clone, Debug)]
pub struct DenseLinear {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    in_features: usize,
    out_features: usize,
}

impl DenseLinear {
    /// `weight` is `[out_features, in_features]`; the caller has checked the shapes.
    pub fn new(weight: Vec<f32>, bias: Option<Vec<f32>>, out_features: usize, in_features: usize) -> Self {
        assert_eq!(weight.len(), out_features * in_features, "DenseLinear: weight shape");
        if let Some(b) = &bias {
            assert_eq!(b.len(), out_features, "DenseLinear: bias shape");
        }
        Self { weight, bias, in_features, out_features }
    }

    pub fn weight(&self) -> &[f32] {
        &self.weight
    }
}

impl Linear for DenseLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        matmul_xwt(x, &self.weight, out, m, self.out_features, self.in_features);
        if let Some(bias) = &self.bias {
            add_bias(out, bias);
        }
    }

    fn weight_row(&self, row: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.weight[row * self.in_features..(row + 1) * self.in_features]);
    }

    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    fn weight_bytes(&self) -> usize {
        (self.weight.len() + self.bias.as_ref().map_or(0, Vec::len)) * std::mem::size_of::<f32>()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
