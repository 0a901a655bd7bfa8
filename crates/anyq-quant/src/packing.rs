//! Dense packing of sub-byte integers.
//!
//! Value `i` of `b` bits occupies bits `[i·b, (i+1)·b)` of the stream, and stream bit `k` is bit
//! `k % 8` of byte `k / 8` (least significant first): no padding between values, so 3-bit values
//! straddle bytes, and the last byte's unused high bits are zero. With 4 bits, value 0 is the low
//! nibble of byte 0.
//!
//! Signed values are stored as their low `b` bits of two's complement, which holds
//! `[−2^(b−1), 2^(b−1) − 1]`: every stored value of a `QuantizedMatrix` (symmetric, shifted
//! asymmetric, and bit-balanced INT2 in 3 bits) fits its spec's `storage_bits()`. Unsigned values
//! hold `[0, 2^b − 1]`. A value outside its range is an error rather than silently truncated.

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("bit width {bits} is outside 1..=8")]
    InvalidBits { bits: u8 },
    #[error("value {value} at index {index} does not fit in {bits} bits")]
    ValueOutOfRange { index: usize, value: i16, bits: u8 },
    #[error("{n} values of {bits} bits need {needed} bytes, got {got}")]
    ShortBuffer { n: usize, bits: u8, needed: usize, got: usize },
}

/// Bytes holding `n` values of `bits` bits: `⌈n · bits / 8⌉`, without overflowing for any `n`.
pub fn packed_len(n: usize, bits: u8) -> usize {
    let bits = bits as usize;
    (n / 8).saturating_mul(bits).saturating_add((n % 8 * bits).div_ceil(8))
}

/// Packs signed values, each in `[−2^(b−1), 2^(b−1) − 1]`, as `bits`-bit two's complement.
pub fn pack(values: &[i8], bits: u8) -> Result<Vec<u8>, PackError> {
    check_bits(bits)?;
    let (min, max) = (-(1i16 << (bits - 1)), (1i16 << (bits - 1)) - 1);
    if let Some(index) = values.iter().position(|&v| !(min..=max).contains(&(v as i16))) {
        return Err(PackError::ValueOutOfRange { index, value: values[index] as i16, bits });
    }
    Ok(pack_codes(values.iter().map(|&v| v as u8), values.len(), bits))
}

/// Packs unsigned values, each in `[0, 2^b − 1]`.
pub fn pack_unsigned(values: &[u8], bits: u8) -> Result<Vec<u8>, PackError> {
    check_bits(bits)?;
    let max = (1u16 << bits) - 1;
    if let Some(index) = values.iter().position(|&v| v as u16 > max) {
        return Err(PackError::ValueOutOfRange { index, value: values[index] as i16, bits });
    }
    Ok(pack_codes(values.iter().copied(), values.len(), bits))
}

/// Unpacks `n` signed values (sign-extended) from the front of `bytes`; bytes past
/// `packed_len(n, bits)` are ignored.
pub fn unpack(bytes: &[u8], bits: u8, n: usize) -> Result<Vec<i8>, PackError> {
    let unused = 8 - bits.clamp(1, 8);
    // Shifting the code to the top of the byte and back arithmetically copies its sign bit.
    unpack_codes(bytes, bits, n, |code| ((code << unused) as i8) >> unused)
}

/// `unpack` into a caller's buffer (`out.len()` values), for hot loops that must not allocate.
pub fn unpack_into(bytes: &[u8], bits: u8, out: &mut [i8]) -> Result<(), PackError> {
    let unused = 8 - bits.clamp(1, 8);
    unpack_codes_into(bytes, bits, out, |code| ((code << unused) as i8) >> unused)
}

/// Unpacks `n` unsigned values from the front of `bytes`; bytes past `packed_len(n, bits)` are
/// ignored.
pub fn unpack_unsigned(bytes: &[u8], bits: u8, n: usize) -> Result<Vec<u8>, PackError> {
    unpack_codes(bytes, bits, n, |code| code)
}

fn check_bits(bits: u8) -> Result<(), PackError> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(PackError::InvalidBits { bits })
    }
}

/// Packs the low `bits` bits of each code; `bits` is valid.
fn pack_codes(codes: impl Iterator<Item = u8>, n: usize, bits: u8) -> Vec<u8> {
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(packed_len(n, bits));
    // Bits not yet written, least significant first; never more than 7 + 8 of them.
    let (mut pending, mut pending_bits) = (0u32, 0u8);
    for code in codes {
        pending |= (code as u32 & mask) << pending_bits;
        pending_bits += bits;
        while pending_bits >= 8 {
            out.push(pending as u8);
            pending >>= 8;
            pending_bits -= 8;
        }
    }
    if pending_bits > 0 {
        out.push(pending as u8);
    }
    out
}

fn unpack_codes<T: Copy + Default>(
    bytes: &[u8],
    bits: u8,
    n: usize,
    decode: impl Fn(u8) -> T,
) -> Result<Vec<T>, PackError> {
    let mut out = vec![T::default(); n];
    unpack_codes_into(bytes, bits, &mut out, decode)?;
    Ok(out)
}

fn unpack_codes_into<T>(bytes: &[u8], bits: u8, out: &mut [T], decode: impl Fn(u8) -> T) -> Result<(), PackError> {
    check_bits(bits)?;
    let n = out.len();
    let needed = packed_len(n, bits);
    if bytes.len() < needed {
        return Err(PackError::ShortBuffer { n, bits, needed, got: bytes.len() });
    }
    // Widths that divide a byte: values never straddle bytes, and byte-wise loops vectorize
    // (decode reads every stored value of a weight-only layer per token).
    match bits {
        8 => unpack_whole_bytes::<1, T>(bytes, out, decode),
        4 => unpack_whole_bytes::<2, T>(bytes, out, decode),
        2 => unpack_whole_bytes::<4, T>(bytes, out, decode),
        _ => unpack_straddling(bytes, bits, out, decode),
    }
    Ok(())
}

/// Widths whose values may straddle bytes (3, 5, 6, 7 bits): a bit stream.
fn unpack_straddling<T>(bytes: &[u8], bits: u8, out: &mut [T], decode: impl Fn(u8) -> T) {
    let mask = (1u32 << bits) - 1;
    let mut next_byte = bytes.iter();
    let (mut pending, mut pending_bits) = (0u32, 0u8);
    for value in out.iter_mut() {
        if pending_bits < bits {
            // The caller checked that the bytes hold every bit of the values.
            pending |= (*next_byte.next().unwrap_or(&0) as u32) << pending_bits;
            pending_bits += 8;
        }
        *value = decode((pending & mask) as u8);
        pending >>= bits;
        pending_bits -= bits;
    }
}

/// `PER` values of `8 / PER` bits per byte, low bits first.
fn unpack_whole_bytes<const PER: usize, T>(bytes: &[u8], out: &mut [T], decode: impl Fn(u8) -> T) {
    let bits = (8 / PER) as u8;
    let mask = ((1u16 << bits) - 1) as u8;
    let whole = out.len() / PER;
    let mut chunks = out.chunks_exact_mut(PER);
    for (values, &byte) in (&mut chunks).zip(bytes) {
        for (i, v) in values.iter_mut().enumerate() {
            *v = decode((byte >> (i as u8 * bits)) & mask);
        }
    }
    let tail = chunks.into_remainder();
    let last = bytes.get(whole).copied().unwrap_or(0);
    for (i, v) in tail.iter_mut().enumerate() {
        *v = decode((last >> (i as u8 * bits)) & mask);
    }
}
