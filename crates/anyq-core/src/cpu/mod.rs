//! CPU kernels. Each works on row-major slices; parallelism comes from rayon's pool, whose
//! size the caller sets once (`--threads`).

mod attention;
pub mod int8;
mod matmul;
mod ops;

pub use attention::{causal_attention, causal_attention_reference, AttentionShape};
pub use matmul::{gemm_rows, matmul_small_k, matmul_xwt, matmul_xwt_reference, transpose};
pub use ops::{
    add_bias, add_inplace, dot, rms_norm, rms_norm_scanned, scan_activations, silu_mul, silu_mul_scanned,
    softmax_inplace, ActivationScan, ChannelSet, Rope, RopeStyle, ScanRequest,
};
