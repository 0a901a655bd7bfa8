"""Regenerates the GGML dequantization fixtures in tests/fixtures/ggml/.

Needs numpy and gguf (pip install numpy gguf). Run: python scripts/ggml_fixture.py

Each type has two files, named after the type in lower case (e.g. q4_k.bin, q4_k.f32):
  <type>.bin  the raw tensor bytes: whole blocks back to back, as stored in a GGUF file;
  <type>.f32  the expected dequantized values, little-endian f32, one per element.
The element count is the size of <type>.f32 divided by 4.

The blocks are random bytes (fixed seed) except the scale fields, which are set to finite
values: random in [-2, 2] for most blocks, large (up to 65504) in the second to last block
and f16 subnormals in the last, so that every expected value is finite. The float types
include signed zeros, infinities, subnormals and a NaN.

Expected values come from gguf.quants.dequantize, ggml's Python implementation (numpy,
independent of the C code and of ours). gguf does not dequantize Q8_K, so that one uses the
numpy lines in q8_k_reference, which follow ggml's dequantize_row_q8_K.
"""
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ggml"
SEED = 20240607

# Byte offsets of each quantized type's scale fields within a block: ("f16" | "f32", offset).
SCALES = {
    T.Q4_0: [("f16", 0)],
    T.Q4_1: [("f16", 0), ("f16", 2)],
    T.Q5_0: [("f16", 0)],
    T.Q5_1: [("f16", 0), ("f16", 2)],
    T.Q8_0: [("f16", 0)],
    T.Q2_K: [("f16", 80), ("f16", 82)],
    T.Q3_K: [("f16", 108)],
    T.Q4_K: [("f16", 0), ("f16", 2)],
    T.Q5_K: [("f16", 0), ("f16", 2)],
    T.Q6_K: [("f16", 208)],
    T.Q8_K: [("f32", 0)],
}
FLOAT_ELEMENTS = 256
LEGACY_BLOCKS = 16  # of 32 elements
K_BLOCKS = 4  # of 256 elements


def q8_k_reference(raw: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q8_K: y = d * q, d an f32, then 256 int8 (bsums unused)."""
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[T.Q8_K][1])
    d = blocks[:, :4].copy().view("<f4")
    qs = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    return (d * qs).reshape(-1)


def quantized_blocks(rng: np.random.Generator, qtype: T) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = K_BLOCKS if block_size == 256 else LEGACY_BLOCKS
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for kind, offset in SCALES[qtype]:
        dtype = np.dtype("<f2") if kind == "f16" else np.dtype("<f4")
        values = rng.uniform(-2.0, 2.0, size=n_blocks).astype(dtype)
        values[-2] = rng.choice([-1.0, 1.0]) * rng.uniform(1000.0, 65504.0)
        # An f16 subnormal (exponent bits zero); Q8_K's f32 scale just gets the same tiny value.
        tiny = np.uint16(rng.integers(1, 0x400)) | np.uint16(rng.choice([0, 0x8000]))
        values[-1] = np.array([tiny], dtype=np.uint16).view(np.float16)[0]
        width = np.dtype(dtype).itemsize
        blocks[:, offset:offset + width] = values.astype(dtype).view(np.uint8).reshape(n_blocks, width)
    return blocks.reshape(-1)


def float_bytes(rng: np.random.Generator, qtype: T) -> np.ndarray:
    values = (rng.standard_normal(FLOAT_ELEMENTS) * 10.0 ** rng.integers(-6, 5, FLOAT_ELEMENTS)).astype(np.float32)
    specials = [0.0, -0.0, 1.0, -2.0, np.inf, -np.inf, np.nan]
    values[: len(specials)] = specials
    if qtype == T.F32:
        values[len(specials)] = np.float32(1e-40)  # subnormal
        return values.astype("<f4").view(np.uint8)
    if qtype == T.F16:
        halves = values.astype(np.float16)
        halves[len(specials)] = np.float16(2.0**-24)  # smallest subnormal
        halves[len(specials) + 1] = np.float16(65504.0)
        return halves.view(np.uint8)
    # BF16: the top halves of f32 values (truncation; rounding is the quantizer's business).
    tops = (values.view(np.uint32) >> 16).astype("<u2")
    tops[len(specials)] = 0x0001  # subnormal
    return tops.view(np.uint8)


def main() -> None:
    rng = np.random.default_rng(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    for qtype in [T.F32, T.F16, T.BF16, *SCALES]:
        raw = float_bytes(rng, qtype) if qtype in (T.F32, T.F16, T.BF16) else quantized_blocks(rng, qtype)
        expected = q8_k_reference(raw) if qtype == T.Q8_K else dequantize(raw, qtype)
        expected = np.asarray(expected, dtype=np.float32).reshape(-1)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        assert raw.size == expected.size // block_size * type_size, qtype.name
        finite = np.isfinite(expected)
        assert finite.all() or qtype in (T.F32, T.F16, T.BF16), qtype.name
        name = qtype.name.lower()
        (OUT / f"{name}.bin").write_bytes(raw.tobytes())
        (OUT / f"{name}.f32").write_bytes(expected.astype("<f4").tobytes())
        print(f"{name}: {expected.size} elements, {raw.size} bytes")


if __name__ == "__main__":
    main()
