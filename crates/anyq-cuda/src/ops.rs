//! Kernels of the FP16 model on the GPU (normalisation, RoPE, attention, sampling).
