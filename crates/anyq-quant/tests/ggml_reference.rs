//! GGML dequantization against values computed by the `gguf` Python package (see
//! `scripts/ggml_fixture.py`, which regenerates the fixtures), plus length and id errors.

use std::path::PathBuf;

use anyq_quant::ggml::{GgmlError, GgmlType};

/// Every type, found through the id table so that a type missing from it is noticed.
fn all_types() -> Vec<GgmlType> {
    let types: Vec<GgmlType> = (0..=255).filter_map(GgmlType::from_id).collect();
    assert_eq!(types.len(), 14, "{types:?}");
    types
}

fn fixture(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ggml");
    let name = ty.name().to_lowercase();
    let read = |ext: &str| {
        let path = dir.join(format!("{name}.{ext}"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let raw = read("bin");
    let expected = read("f32");
    assert_eq!(expected.len() % 4, 0, "{name}.f32");
    let expected = expected.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (raw, expected)
}

/// Bit-exact equality, except that any NaN equals any NaN.
fn assert_same(ty: GgmlType, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{ty}");
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let same = g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan());
        assert!(same, "{ty}: element {i} (block {}): got {g:e}, expected {e:e}", i / ty.block_size());
    }
}

#[test]
fn matches_gguf_reference() {
    for ty in all_types() {
        let (raw, expected) = fixture(ty);
        assert_eq!(ty.bytes_for(expected.len()), Ok(raw.len()), "{ty}: fixture size");
        assert!(expected.len() >= 2 * ty.block_size(), "{ty}: fixture too small");
        let mut got = vec![f32::NAN; expected.len()];
        ty.dequantize(&raw, &mut got).unwrap();
        assert_same(ty, &got, &expected);
    }
}

#[test]
fn large_tensors_match_reference_in_parallel() {
    // Enough copies of the fixture to take the multi-threaded path, with a part copy at the
    // end so the last parallel chunk is short.
    for ty in all_types() {
        let (raw, expected) = fixture(ty);
        let copies = (1 << 18) / expected.len() + 1;
        let extra_blocks = expected.len() / ty.block_size() / 2;
        let mut big_raw = raw.repeat(copies);
        big_raw.extend_from_slice(&raw[..extra_blocks * ty.type_size()]);
        let mut big_expected = expected.repeat(copies);
        big_expected.extend_from_slice(&expected[..extra_blocks * ty.block_size()]);

        let mut got = vec![f32::NAN; big_expected.len()];
        ty.dequantize(&big_raw, &mut got).unwrap();
        assert_same(ty, &got, &big_expected);
    }
}

#[test]
fn ids_names_and_sizes_match_ggml() {
    // (id, name, block size, bytes per block) from ggml.h / ggml.c.
    let table = [
        (0, "F32", 1, 4),
        (1, "F16", 1, 2),
        (2, "Q4_0", 32, 18),
        (3, "Q4_1", 32, 20),
        (6, "Q5_0", 32, 22),
        (7, "Q5_1", 32, 24),
        (8, "Q8_0", 32, 34),
        (10, "Q2_K", 256, 84),
        (11, "Q3_K", 256, 110),
        (12, "Q4_K", 256, 144),
        (13, "Q5_K", 256, 176),
        (14, "Q6_K", 256, 210),
        (15, "Q8_K", 256, 292),
        (30, "BF16", 1, 2),
    ];
    for (id, name, block_size, type_size) in table {
        let ty = GgmlType::from_id(id).unwrap_or_else(|| panic!("id {id}"));
        assert_eq!((ty.id(), ty.name(), ty.block_size(), ty.type_size()), (id, name, block_size, type_size));
        assert_eq!(format!("{ty:?}"), name);
        assert_eq!(ty.to_string(), name);
    }
    assert_eq!(GgmlType::from_id(12), Some(GgmlType::Q4_K));
    assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
}

#[test]
fn unknown_ids_are_none() {
    // 4, 5: removed Q4_2/Q4_3; 9: Q8_1; 16..=29: IQ formats and others; 31+: later types.
    for id in [4, 5, 9, 16, 20, 29, 31, 39, 1000, u32::MAX] {
        assert_eq!(GgmlType::from_id(id), None, "id {id}");
    }
}

#[test]
fn element_counts_must_be_whole_blocks() {
    let err = GgmlType::Q4_K.bytes_for(1000).unwrap_err();
    assert_eq!(err.to_string(), "Q4_K: 1000 elements is not a multiple of the block size 256");
    assert_eq!(
        GgmlType::Q4_0.bytes_for(33).unwrap_err(),
        GgmlError::NotBlockMultiple { ty: GgmlType::Q4_0, n_elements: 33, block_size: 32 }
    );
    assert_eq!(GgmlType::Q4_0.bytes_for(0), Ok(0));
    assert_eq!(GgmlType::Q6_K.bytes_for(512), Ok(420));
    assert_eq!(GgmlType::F16.bytes_for(3), Ok(6));

    // The dequantizer checks the element count before the bytes.
    let mut dst = vec![0.0; 300];
    let err = GgmlType::Q8_K.dequantize(&[0; 292], &mut dst).unwrap_err();
    assert!(matches!(err, GgmlError::NotBlockMultiple { n_elements: 300, block_size: 256, .. }), "{err}");
}

#[test]
fn byte_counts_must_match() {
    let mut dst = vec![0.0; 640];
    let err = GgmlType::Q4_1.dequantize(&[0; 100], &mut dst).unwrap_err();
    assert_eq!(err.to_string(), "Q4_1: expected 400 bytes for 640 elements, got 100");

    for ty in all_types() {
        let n = 4 * ty.block_size();
        let bytes = ty.bytes_for(n).unwrap();
        let mut dst = vec![0.0; n];
        for len in [0, 1, bytes - 1, bytes + 1, bytes + ty.type_size(), 2 * bytes] {
            let err = ty.dequantize(&vec![0; len], &mut dst).unwrap_err();
            assert_eq!(err, GgmlError::LengthMismatch { ty, n_elements: n, expected: bytes, got: len });
        }
        assert!(ty.dequantize(&[], &mut []).is_ok(), "{ty}: empty tensor");
    }
}

#[test]
fn huge_element_counts_are_errors() {
    for ty in all_types() {
        let n = usize::MAX / ty.block_size() * ty.block_size();
        let bytes = (n / ty.block_size()) as u128 * ty.type_size() as u128;
        match usize::try_from(bytes) {
            Ok(bytes) => assert_eq!(ty.bytes_for(n), Ok(bytes), "{ty}"),
            Err(_) => assert_eq!(ty.bytes_for(n), Err(GgmlError::TooLarge { ty, n_elements: n })),
        }
    }
    assert!(matches!(GgmlType::Q8_0.bytes_for(usize::MAX / 32 * 32), Err(GgmlError::TooLarge { .. })));
    assert!(matches!(GgmlType::F32.bytes_for(usize::MAX / 4 + 1), Err(GgmlError::TooLarge { .. })));
    assert!(GgmlType::F32.bytes_for(usize::MAX / 4).is_ok());
}

#[test]
fn no_panics_on_arbitrary_lengths() {
    // A small xorshift keeps the test free of dependencies.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    for ty in all_types() {
        for _ in 0..200 {
            let src: Vec<u8> = (0..next(2000)).map(|_| next(256) as u8).collect();
            let mut dst = vec![0.0; next(2000)];
            let ok = ty.bytes_for(dst.len()).is_ok_and(|b| b == src.len());
            assert_eq!(ty.dequantize(&src, &mut dst).is_ok(), ok, "{ty}: {} -> {}", src.len(), dst.len());
        }
    }
}

#[test]
fn float_formats_convert_exactly() {
    let f16_cases: [(u16, f32); 8] = [
        (0x3C00, 1.0),
        (0xC000, -2.0),
        (0x3555, 0.25 * (1.0 + 341.0 / 1024.0)), // 0.333251953125
        (0x7BFF, 65504.0),
        (0x0001, 2f32.powi(-24)), // smallest subnormal
        (0x0400, 2f32.powi(-14)), // smallest normal
        (0x7C00, f32::INFINITY),
        (0xFC00, f32::NEG_INFINITY),
    ];
    for (bits, value) in f16_cases {
        assert_eq!(convert(GgmlType::F16, &bits.to_le_bytes()).to_bits(), value.to_bits(), "f16 {bits:#06x}");
    }
    assert_eq!(convert(GgmlType::F16, &0x8000u16.to_le_bytes()).to_bits(), (-0.0f32).to_bits());
    assert!(convert(GgmlType::F16, &0x7E00u16.to_le_bytes()).is_nan());

    // bf16 is the top half of an f32, NaN payloads included.
    for bits in [0x3F80u16, 0xC049, 0x0001, 0x8000, 0x7F80, 0xFF80, 0x7F81, 0xFFC1] {
        let got = convert(GgmlType::BF16, &bits.to_le_bytes());
        assert_eq!(got.to_bits(), (bits as u32) << 16, "bf16 {bits:#06x}");
    }
    assert_eq!(convert(GgmlType::BF16, &0x4049u16.to_le_bytes()), 3.140625);

    for value in [std::f32::consts::PI, -0.0, 1e-45, f32::MAX, f32::from_bits(0x7FA0_0001)] {
        assert_eq!(convert(GgmlType::F32, &value.to_le_bytes()).to_bits(), value.to_bits());
    }

    // Several elements keep their order (little-endian, element i at bytes 2i..2i+2).
    let mut dst = [0.0; 3];
    GgmlType::F16.dequantize(&[0x00, 0x3C, 0x00, 0x40, 0x00, 0xBC], &mut dst).unwrap();
    assert_eq!(dst, [1.0, 2.0, -1.0]);
}

fn convert(ty: GgmlType, bytes: &[u8]) -> f32 {
    let mut dst = [0.0];
    ty.dequantize(bytes, &mut dst).unwrap();
    dst[0]
}

#[test]
fn q4_0_by_hand() {
    // d = 0.5; byte j holds element j (low nibble) and element j + 16 (high nibble), less 8.
    let mut block = vec![0x00, 0x38];
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut got = [0.0; 32];
    GgmlType::Q4_0.dequantize(&block, &mut got).unwrap();
    let expected: Vec<f32> = (0..32).map(|i: i32| (if i < 16 { i } else { 31 - i } - 8) as f32 * 0.5).collect();
    assert_eq!(got.to_vec(), expected);
}
