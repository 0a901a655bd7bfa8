//! MixQ linear layers on NVIDIA GPUs: weights in the fragment-major layout of `kernels/mixq.cu`,
//! the fused producer (normalise, per-token amax, INT8 quantization, outlier gather) and the
//! fused GEMM (INT8 MMA on the bulk + FP16 MMA on the outlier channels, one epilogue).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;

use crate::compile::{kernel_source, KernelSource};
use crate::tma::{block_map, launch_ex, tile_map, Element, LaunchOptions, Layout, TensorMap};
use crate::{CudaDevice, CudaError, Result};

pub(crate) const MIXQ: KernelSource = kernel_source!("mixq");
pub(crate) const FILL: KernelSource = kernel_source!("fill");

/// k per pipeline stage of the GEMM: activation rows and weight columns are padded to it.
pub const K_TILE: usize = 128;
/// Outlier channels are padded to this many (one FP16 stage of the GEMM).
pub const OUTLIER_TILE: usize = 64;
/// Up to this many tokens the GEMV kernels run (one pass of the streaming one); above it the tiled
/// GEMMs.
pub const GEMV_MAX_TOKENS: usize = 16;
/// Tokens up to which [`Kernel::Auto`] may stream W4 weights (16 tokens a pass, the later passes
/// reading the weights from L2 where they fit) where the tiled GEMM's tiles would leave SMs idle.
pub const STREAM_MAX_TOKENS: usize = 64;
/// Up to this many tokens W4A8's GEMV multiplies with dp4a rather than a 16-row mma.
const DP4A_MAX_TOKENS: usize = 4;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// The outlier channels of one linear input, in increasing order, and their gather map.
pub struct OutlierSet {
    channels: Vec<u32>,
    /// `slot[c]` = position of channel `c` among the outliers, or -1.
    slot: CudaSlice<i32>,
    k: usize,
}

impl OutlierSet {
    pub fn new(device: &CudaDevice, k: usize, channels: &[u32]) -> Result<Arc<Self>> {
        let mut slot = vec![-1i32; k];
        for (i, pair) in channels.windows(2).enumerate() {
            if pair[0] >= pair[1] {
                return Err(CudaError::Shape(format!(
                    "outlier channels must increase: {} then {} at {i}",
                    pair[0], pair[1]
                )));
            }
        }
        for (i, &c) in channels.iter().enumerate() {
            let entry = slot
                .get_mut(c as usize)
                .ok_or_else(|| CudaError::Shape(format!("outlier channel {c} is outside the input's {k} channels")))?;
            *entry = i as i32;
        }
        Ok(Arc::new(Self { channels: channels.to_vec(), slot: device.upload(&slot)?, k }))
    }

    pub fn channels(&self) -> &[u32] {
        &self.channels
    }

    pub fn padded_len(&self) -> usize {
        round_up(self.channels.len(), OUTLIER_TILE)
    }
}

/// Int8 weights `q[n][k]`, row-major, padded to `[round_up(n, 8)][round_up(k, 128)]` with zeros.
pub fn pack_w8(q: &[i8], n: usize, k: usize) -> Vec<u8> {
    let k_pad = round_up(k, K_TILE);
    let mut out = vec![0u8; round_up(n, 8) * k_pad];
    for (row, dst) in q.chunks_exact(k).zip(out.chunks_exact_mut(k_pad)) {
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = v as u8;
        }
    }
    out
}

/// Unsigned 4-bit weights `q[n][k]` (0..=15), padded to `round_up(n, 8)` rows of
/// `round_up(k, 128) / 2` bytes, in 64-byte row slices (128 k) stored tile by tile: the 8 rows of
/// a tile have their slice `c` in 512 contiguous bytes, at `(tile · slices + c) · 512 + row · 64`,
/// so that a warp streaming one tile reads whole 512-byte runs. In each 32-k block (16 bytes) of a
/// slice, byte j holds k = j in its low nibble and k = j + 16 in its high one. Padding columns
/// take `pad(row, col)` (the row's zero point: they dequantize to 0).
pub fn pack_w4(q: &[u8], n: usize, k: usize, pad: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let k_pad = round_up(k, K_TILE);
    let slices = k_pad / 128;
    let mut out = vec![0u8; round_up(n, 8) * k_pad / 2];
    for row in 0..n {
        let value = |col: usize| if col < k { q[row * k + col] & 15 } else { pad(row, col) & 15 };
        for slice in 0..slices {
            let at = (row / 8 * slices + slice) * 512 + row % 8 * 64;
            for (i, byte) in out[at..at + 64].iter_mut().enumerate() {
                let col = slice * 128 + i / 16 * 32 + i % 16;
                *byte = value(col) | (value(col + 16) << 4);
            }
        }
    }
    out
}

/// FP16 outlier weights `w[n][ko]`, row-major, padded to `[round_up(n, 8)][ko_pad]` with zeros.
pub fn pack_f16(w: &[f16], n: usize, ko: usize, ko_pad: usize) -> Vec<u16> {
    let mut out = vec![0u16; round_up(n, 8) * ko_pad];
    if ko > 0 {
        for (row, dst) in w.chunks_exact(ko).zip(out.chunks_exact_mut(ko_pad)) {
            for (d, v) in dst.iter_mut().zip(row) {
                *d = v.to_bits();
            }
        }
    }
    out
}

/// A MixQ linear layer's weights on the GPU.
pub struct MixqWeight {
    bits: u32,
    n: usize,
    k: usize,
    group_tiles: usize,
    qweight: CudaSlice<u8>,
    scales: CudaSlice<f32>,
    zeros: CudaSlice<u8>,
    outlier_weight: CudaSlice<u16>,
    outliers: Arc<OutlierSet>,
}

impl MixqWeight {
    /// W8: `q[n][k]` with per-row `scales[n]`; `outlier_weight[n][ko]` for `outliers`' channels.
    pub fn w8(
        device: &CudaDevice,
        q: &[i8],
        scales: &[f32],
        (n, k): (usize, usize),
        outliers: &Arc<OutlierSet>,
        outlier_weight: &[f16],
    ) -> Result<Self> {
        check_shape("q", q.len(), n * k)?;
        check_shape("scales", scales.len(), n)?;
        let mut padded_scales = scales.to_vec();
        padded_scales.resize(round_up(n, 8), 0.0);
        Self::assemble(device, 8, (n, k), 1, pack_w8(q, n, k), &padded_scales, &[0], outliers, outlier_weight)
    }

    /// W4: unsigned `q[n][k]` (0..=15), `scales`/`zeros` per row and group of `group` k
    /// (a multiple of 128): w = scale · (q − zero).
    #[allow(clippy::too_many_arguments)]
    pub fn w4(
        device: &CudaDevice,
        q: &[u8],
        scales: &[f32],
        zeros: &[u8],
        (n, k): (usize, usize),
        group: usize,
        outliers: &Arc<OutlierSet>,
        outlier_weight: &[f16],
    ) -> Result<Self> {
        if group == 0 || !group.is_multiple_of(K_TILE) {
            return Err(CudaError::Shape(format!("GPU W4 groups must be a multiple of {K_TILE} k, not {group}")));
        }
        let groups = k.div_ceil(group);
        check_shape("q", q.len(), n * k)?;
        check_shape("scales", scales.len(), n * groups)?;
        check_shape("zeros", zeros.len(), n * groups)?;
        let packed = pack_w4(q, n, k, |row, col| zeros[row * groups + col / group]);
        // Group-major on the device: the rows a warp reads for one group are adjacent.
        let n_pad = round_up(n, 8);
        let mut padded_scales = vec![0.0f32; n_pad * groups];
        let mut padded_zeros = vec![0u8; n_pad * groups];
        for row in 0..n {
            for g in 0..groups {
                padded_scales[g * n_pad + row] = scales[row * groups + g];
                padded_zeros[g * n_pad + row] = zeros[row * groups + g];
            }
        }
        Self::assemble(
            device,
            4,
            (n, k),
            group / K_TILE,
            packed,
            &padded_scales,
            &padded_zeros,
            outliers,
            outlier_weight,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        device: &CudaDevice,
        bits: u32,
        (n, k): (usize, usize),
        group_tiles: usize,
        packed: Vec<u8>,
        scales: &[f32],
        zeros: &[u8],
        outliers: &Arc<OutlierSet>,
        outlier_weight: &[f16],
    ) -> Result<Self> {
        if outliers.k != k {
            return Err(CudaError::Shape(format!("outlier set is for {} inputs, the weight has {k}", outliers.k)));
        }
        let ko = outliers.channels.len();
        check_shape("outlier weight", outlier_weight.len(), n * ko)?;
        let outlier_packed = pack_f16(outlier_weight, n, ko, outliers.padded_len());
        Ok(Self {
            bits,
            n,
            k,
            group_tiles,
            qweight: device.upload(&packed)?,
            scales: device.upload(scales)?,
            zeros: device.upload(zeros)?,
            outlier_weight: device.upload(&outlier_packed)?,
            outliers: outliers.clone(),
        })
    }

    /// Random weights made on the device, for benchmarks at full model size.
    pub fn random(
        device: &CudaDevice,
        bits: u32,
        (n, k): (usize, usize),
        outliers: &Arc<OutlierSet>,
        seed: u64,
    ) -> Result<Self> {
        let (k_pad, n_pad, ko_pad) = (round_up(k, K_TILE), round_up(n, 8), outliers.padded_len());
        let groups = if bits == 4 { k_pad / K_TILE } else { 1 };
        let mut qweight = device.zeros::<u8>(n_pad * k_pad * bits as usize / 8)?;
        let mut scales = device.zeros::<f32>(n_pad * groups)?;
        let mut outlier_weight = device.zeros::<u16>(n_pad * ko_pad)?;
        fill_bytes(device, &mut qweight, seed)?;
        fill_f32_range(device, &mut scales, seed + 1, 1e-3, 2e-3)?;
        fill_f16(device, &mut outlier_weight, seed + 2, 0.05)?;
        let zeros = device.upload(&vec![8u8; n_pad * groups])?;
        Ok(Self { bits, n, k, group_tiles: 1, qweight, scales, zeros, outlier_weight, outliers: outliers.clone() })
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    pub fn outliers(&self) -> &Arc<OutlierSet> {
        &self.outliers
    }
}

fn check_shape(name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(CudaError::Shape(format!("{name} holds {got} values, the shape needs {want}")));
    }
    Ok(())
}

/// What the producer kernel applies to its input rows before quantizing them.
pub enum Producer<'a> {
    /// f16 rows `[tokens][k]` as they are (the attention output into o_proj).
    Plain { x: &'a CudaSlice<u16> },
    /// RMSNorm of the f32 residual stream `x[tokens][k]` with weight `gamma[k]`.
    RmsNorm { x: &'a CudaSlice<f32>, gamma: &'a CudaSlice<f32>, eps: f32 },
    /// SiLU(gate) · up from f16 rows `[tokens][2k]` holding the gate then the up projection.
    SiluMul { gate_up: &'a CudaSlice<u16> },
}

/// Rows the activation buffers hold beyond their tokens, up to a multiple of: the TMA kernels'
/// tiles of tokens (two blocks' 128 rows) then read only rows that exist. Rows past the tensor
/// map's end are filled with zeros by the copy engine at a much lower rate: 14336x4096 at 160
/// tokens (96 such rows in the second tile) ran 318 TOP/s against 912 at 256.
const ROW_PAD: usize = 256;

/// Quantized activations for up to `capacity` tokens: INT8 rows with the outlier channels
/// zeroed, per-token scales, and the outlier channels gathered in FP16; the INT8 and FP16 rows
/// are allocated up to a multiple of [`ROW_PAD`] (their contents past the tokens are never
/// used: an output row depends only on its own activation row).
pub struct MixqActivations {
    outliers: Arc<OutlierSet>,
    capacity: usize,
    tokens: usize,
    k_pad: usize,
    xq: CudaSlice<i8>,
    sx: CudaSlice<f32>,
    xo: CudaSlice<u16>,
    over_threshold: CudaSlice<u32>,
}

impl MixqActivations {
    pub fn new(device: &CudaDevice, capacity: usize, outliers: &Arc<OutlierSet>) -> Result<Self> {
        let (k_pad, rows) = (round_up(outliers.k, K_TILE), round_up(capacity, ROW_PAD));
        Ok(Self {
            outliers: outliers.clone(),
            capacity,
            tokens: 0,
            k_pad,
            xq: device.zeros(rows * k_pad)?,
            sx: device.zeros(capacity)?,
            xo: device.zeros(rows * outliers.padded_len())?,
            over_threshold: device.zeros(1)?,
        })
    }

    /// Activations quantized elsewhere: `xq[tokens][k]`, `sx[tokens]`, `xo[tokens][ko]`.
    pub fn from_host(
        device: &CudaDevice,
        outliers: &Arc<OutlierSet>,
        xq: &[i8],
        sx: &[f32],
        xo: &[f16],
    ) -> Result<Self> {
        let (tokens, k, ko, ko_pad) = (sx.len(), outliers.k, outliers.channels.len(), outliers.padded_len());
        check_shape("xq", xq.len(), tokens * k)?;
        check_shape("xo", xo.len(), tokens * ko)?;
        let mut acts = Self::new(device, tokens, outliers)?;
        let rows = round_up(tokens, ROW_PAD);
        let mut padded = vec![0i8; rows * acts.k_pad];
        let mut gathered = vec![0u16; rows * ko_pad];
        for t in 0..tokens {
            padded[t * acts.k_pad..][..k].copy_from_slice(&xq[t * k..][..k]);
            for (dst, src) in gathered[t * ko_pad..][..ko].iter_mut().zip(&xo[t * ko..][..ko]) {
                *dst = src.to_bits();
            }
        }
        acts.xq = device.upload(&padded)?;
        acts.sx = device.upload(sx)?;
        acts.xo = device.upload(&gathered)?;
        acts.tokens = tokens;
        Ok(acts)
    }

    /// `tokens` rows of random activations, for benchmarks.
    pub fn random(device: &CudaDevice, tokens: usize, outliers: &Arc<OutlierSet>, seed: u64) -> Result<Self> {
        let mut acts = Self::new(device, tokens, outliers)?;
        acts.tokens = tokens;
        fill_bytes(device, &mut acts.xq, seed)?;
        fill_f32_range(device, &mut acts.sx, seed + 1, 0.01, 0.02)?;
        fill_f16(device, &mut acts.xo, seed + 2, 8.0)?;
        Ok(acts)
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Quantizes `tokens` rows made by `producer`; tokens whose non-outlier amax exceeds
    /// `threshold` are counted (see [`Self::over_threshold`]).
    pub fn produce(&mut self, device: &CudaDevice, producer: Producer, tokens: usize, threshold: f32) -> Result<()> {
        let k = self.outliers.k;
        if tokens > self.capacity {
            return Err(CudaError::Shape(format!("{tokens} tokens exceed the buffer's {}", self.capacity)));
        }
        let stream = device.stream();
        // The gamma pointer is unused but by RMSNorm: any device pointer will do.
        let (name, (x, _gx), (gamma, _gg), eps) = match producer {
            Producer::Plain { x } => {
                check_at_least("x", x.len(), tokens * k)?;
                ("mixq_produce_plain", x.device_ptr(stream), x.device_ptr(stream), 0.0)
            }
            Producer::RmsNorm { x, gamma, eps } => {
                check_at_least("x", x.len(), tokens * k)?;
                check_at_least("gamma", gamma.len(), k)?;
                ("mixq_produce_rmsnorm", x.device_ptr(stream), gamma.device_ptr(stream), eps)
            }
            Producer::SiluMul { gate_up } => {
                check_at_least("gate_up", gate_up.len(), tokens * 2 * k)?;
                ("mixq_produce_silu_mul", gate_up.device_ptr(stream), gate_up.device_ptr(stream), 0.0)
            }
        };
        self.tokens = tokens;
        if tokens == 0 {
            return Ok(());
        }
        let function = device.function(&MIXQ, name, 0)?;
        let (k_i, ko, k_pad, ko_pad) =
            (k as i32, self.outliers.channels.len() as i32, self.k_pad as i32, self.outliers.padded_len() as i32);
        // Threads enough for PRODUCE_PER (mixq.cu) values each, in whole warps.
        let threads = k.div_ceil(16).next_multiple_of(32).clamp(128, 1024) as u32;
        let config = LaunchConfig { grid_dim: (tokens as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&function);
        launch
            .arg(&x)
            .arg(&gamma)
            .arg(&k_i)
            .arg(&eps)
            .arg(&self.outliers.slot)
            .arg(&ko)
            .arg(&k_pad)
            .arg(&ko_pad)
            .arg(&mut self.xq)
            .arg(&mut self.sx)
            .arg(&mut self.xo)
            .arg(&threshold)
            .arg(&mut self.over_threshold);
        unsafe { launch.launch(config) }?;
        Ok(())
    }

    /// Tokens counted over the threshold since the buffer was made.
    pub fn over_threshold(&self, device: &CudaDevice) -> Result<u32> {
        Ok(device.download(&self.over_threshold)?[0])
    }

    /// The quantized rows, scales and gathered outliers (for tests).
    pub fn download(&self, device: &CudaDevice) -> Result<(Vec<i8>, Vec<f32>, Vec<u16>)> {
        let (xq, sx, xo) = (device.download(&self.xq)?, device.download(&self.sx)?, device.download(&self.xo)?);
        let (kp, kop) = (self.k_pad, self.outliers.padded_len());
        Ok((xq[..self.tokens * kp].to_vec(), sx[..self.tokens].to_vec(), xo[..self.tokens * kop].to_vec()))
    }

    pub fn padded_k(&self) -> usize {
        self.k_pad
    }
}

fn check_at_least(name: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(CudaError::Shape(format!("{name} holds {got} values, at least {want} are needed")));
    }
    Ok(())
}

/// The kernels' argument block (`GemmArgs` in mixq.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct GemmArgs {
    xq: u64,
    sx: u64,
    xo: u64,
    wq: u64,
    sw: u64,
    wz: u64,
    wo: u64,
    y: u64,
    m: i32,
    n: i32,
    k_pad: i32,
    ko_pad: i32,
    group_tiles: i32,
}

unsafe impl DeviceRepr for GemmArgs {}

/// A tiled kernel: its name, output tile and dynamic shared memory.
struct Tiled {
    name: &'static str,
    bm: usize,
    bn: usize,
    smem: u32,
}

/// Any sm_80+: 4 stages of two 128 x 128-byte tiles.
const W8_MMA: Tiled = Tiled { name: "mixq_w8_mma", bm: 128, bn: 128, smem: 4 * 2 * 128 * 128 };
const W4_MMA: Tiled = Tiled { name: "mixq_w4_mma", bm: 128, bn: 128, smem: 4 * 2 * 128 * 128 };

/// Which GEMM kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest for the shape and GPU: a GEMV up to [`GEMV_MAX_TOKENS`] tokens (W4 on Hopper:
    /// streaming passes up to [`STREAM_MAX_TOKENS`] where the tiled GEMM would leave SMs idle),
    /// then the TMA kernels (Hopper) or mma.sync.
    Auto,
    /// GEMV with the weights loaded into registers (any sm_80+ GPU, up to [`GEMV_MAX_TOKENS`]
    /// tokens).
    Gemv,
    /// GEMV whose weights the copy engine streams through shared memory (Hopper; W4 groups of
    /// 128 x a power of two k), a pass per [`GEMV_MAX_TOKENS`] tokens.
    Stream,
    /// [`Kernel::Stream`] for W4 with the activations copied into shared memory once per block
    /// where they fit beside the ring (elsewhere the same as [`Kernel::Stream`]).
    StreamResident,
    /// Tiled mma.sync (any sm_80+ GPU).
    Mma,
    /// Persistent wgmma fed by the copy engine through a ring of stages (Hopper); W4 weights are
    /// unpacked to int8 in shared memory.
    Tma,
    /// [`Kernel::Tma`] for W8 with 128 x 64 output tiles: twice the tiles of few tokens.
    TmaNarrow,
    /// [`Kernel::Tma`] with clusters of two blocks sharing each weight tile by multicast, 128 x
    /// 128 output tiles.
    TmaPair128,
    /// [`Kernel::TmaPair128`] with 128 x 192 tiles.
    TmaPair192,
    /// [`Kernel::TmaPair128`] with 128 x 256 tiles.
    TmaPair256,
}

impl Kernel {
    fn is_tma(self) -> bool {
        matches!(self, Kernel::Tma | Kernel::TmaNarrow | Kernel::TmaPair128 | Kernel::TmaPair192 | Kernel::TmaPair256)
    }
}

/// `y[tokens][n] (f16 bits) = acts · weightᵀ`, dequantized, outliers included.
pub fn gemm(device: &CudaDevice, weight: &MixqWeight, acts: &MixqActivations, y: &mut CudaSlice<u16>) -> Result<()> {
    gemm_with(device, weight, acts, y, Kernel::Auto)
}

/// [`gemm`] with a chosen kernel (tests and benchmarks compare them).
pub fn gemm_with(
    device: &CudaDevice,
    weight: &MixqWeight,
    acts: &MixqActivations,
    y: &mut CudaSlice<u16>,
    kernel: Kernel,
) -> Result<()> {
    if weight.outliers.channels != acts.outliers.channels || weight.k != acts.outliers.k {
        return Err(CudaError::Shape(
            "the activations were quantized for another input (outlier channels or width differ)".into(),
        ));
    }
    let (m, n) = (acts.tokens, weight.n);
    check_at_least("y", y.len(), m * n)?;
    if m == 0 {
        return Ok(());
    }
    let w4 = weight.bits == 4;
    let hopper = device.compute_capability() == (9, 0);
    let stream = hopper && (!w4 || weight.group_tiles.is_power_of_two());
    let sm_count = device.sm_count() as usize;
    let w4_passes =
        w4 && stream && m <= STREAM_MAX_TOKENS && !w4_tiles_beat_passes((m, n), acts.k_pad / K_TILE, sm_count);
    let kernel = match kernel {
        Kernel::Auto if w4_passes && resident_pays(m, n, sm_count) => Kernel::StreamResident,
        Kernel::Auto if w4_passes => Kernel::Stream,
        Kernel::Auto if m <= GEMV_MAX_TOKENS && stream => Kernel::Stream,
        Kernel::Auto if m <= GEMV_MAX_TOKENS => Kernel::Gemv,
        // One block per 128 rows needs no cluster; above that the pairs (sharing the weight
        // tiles) or the one-block kernel, whichever models faster.
        Kernel::Auto if hopper && (w4 || m <= 128) => single_width((m, n), w4, sm_count),
        Kernel::Auto if hopper => w8_tiling((m, n), acts.k_pad / K_TILE, sm_count),
        Kernel::Auto => Kernel::Mma,
        Kernel::Gemv if m > GEMV_MAX_TOKENS => {
            return Err(CudaError::Shape(format!("the GEMV kernel takes up to {GEMV_MAX_TOKENS} tokens, not {m}")))
        }
        Kernel::StreamResident if !w4 => {
            return Err(CudaError::Shape("the StreamResident kernel runs W4 weights only".into()))
        }
        Kernel::Stream | Kernel::StreamResident if !stream => {
            return Err(CudaError::Shape(
                "the Stream kernel runs on Hopper (sm_90) only, W4 weights in groups of 128 x a power of two k".into(),
            ))
        }
        Kernel::Tma if !hopper => return Err(CudaError::Shape("the Tma kernel runs on Hopper (sm_90) only".into())),
        chosen if chosen.is_tma() && chosen != Kernel::Tma && (w4 || !hopper) => {
            return Err(CudaError::Shape(format!("the {kernel:?} kernel runs W8 weights on Hopper (sm_90) only")))
        }
        chosen => chosen,
    };
    let stream = device.stream();
    let (xq, _g1) = acts.xq.device_ptr(stream);
    let (sx, _g2) = acts.sx.device_ptr(stream);
    let (xo, _g3) = acts.xo.device_ptr(stream);
    let (wq, _g4) = weight.qweight.device_ptr(stream);
    let (sw, _g5) = weight.scales.device_ptr(stream);
    let (wz, _g6) = weight.zeros.device_ptr(stream);
    let (wo, _g7) = weight.outlier_weight.device_ptr(stream);
    let (yp, _g8) = y.device_ptr_mut(stream);
    let args = GemmArgs {
        xq,
        sx,
        xo,
        wq,
        sw,
        wz,
        wo,
        y: yp,
        m: m as i32,
        n: n as i32,
        k_pad: acts.k_pad as i32,
        ko_pad: acts.outliers.padded_len() as i32,
        group_tiles: weight.group_tiles as i32,
    };
    if kernel.is_tma() {
        return gemm_tma(device, &args, kernel, w4);
    }
    if matches!(kernel, Kernel::Stream | Kernel::StreamResident) {
        // A pass per 16 tokens: their rows of the activations, scales, outliers and output.
        let (k_pad, ko_pad) = (args.k_pad as u64, args.ko_pad as u64);
        for first in (0..m).step_by(GEMV_MAX_TOKENS) {
            let row = first as u64;
            let pass = GemmArgs {
                xq: args.xq + row * k_pad,
                sx: args.sx + row * 4,
                xo: args.xo + row * ko_pad * 2,
                y: args.y + row * n as u64 * 2,
                m: (m - first).min(GEMV_MAX_TOKENS) as i32,
                ..args
            };
            gemv_stream(device, &pass, w4, kernel == Kernel::StreamResident)?;
        }
        return Ok(());
    }
    if kernel == Kernel::Gemv {
        let name = match (w4, m) {
            (true, ..=DP4A_MAX_TOKENS) => "mixq_w4_gemv_dp4a",
            (true, 9..) => "mixq_w4_gemv16",
            (true, _) => "mixq_w4_gemv8",
            (false, 9..) => "mixq_w8_gemv16",
            (false, _) => "mixq_w8_gemv8",
        };
        // Warps per 8-row weight tile (they split its k): enough warps in all for every SM to
        // keep many loads in flight, at most 8 (a block).
        let tiles = n.div_ceil(8);
        let split = (32 * device.sm_count() as usize).div_ceil(tiles).next_power_of_two().min(8) as i32;
        // The dp4a kernel keeps the tokens' outlier activations in shared memory.
        let smem = if m <= DP4A_MAX_TOKENS && w4 { (m * acts.outliers.padded_len() * 2) as u32 } else { 0 };
        // A persistent grid of as many blocks as fit on the GPU at once.
        let function = device.function(&MIXQ, name, 0)?;
        let per_sm = device.resident_blocks(name, &function, smem)? as usize;
        let groups = tiles.div_ceil(8 / split as usize);
        let config = LaunchConfig {
            grid_dim: (groups.min(per_sm * device.sm_count() as usize) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem,
        };
        let mut launch = stream.launch_builder(&function);
        launch.arg(&args).arg(&split);
        unsafe { launch.launch(config) }?;
        return Ok(());
    }
    let (function, config) = {
        let tiled = if w4 { &W4_MMA } else { &W8_MMA };
        let config = LaunchConfig {
            grid_dim: ((m.div_ceil(tiled.bm) * n.div_ceil(tiled.bn)) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: tiled.smem,
        };
        (device.function(&MIXQ, tiled.name, tiled.smem)?, config)
    };
    let mut launch = stream.launch_builder(&function);
    launch.arg(&args);
    unsafe { launch.launch(config) }?;
    Ok(())
}

/// A `mixq_w4_stream*` ring stage: 16 KiB of weights, 1,440 bytes of scales and zero points and
/// two mbarriers.
const STREAM_STAGE: u32 = 16384 + 1440 + 16;
/// Shared memory of `mixq_w4_stream{8,16}`: 6 stages (`W4_STREAM_STAGES`).
const STREAM_SMEM: u32 = 6 * STREAM_STAGE;
/// Shared memory a Hopper block may use, static and dynamic.
const SMEM_PER_BLOCK: u32 = 227 * 1024;
/// Shared memory of `mixq_w8_stream*`: 8 stages of 16 KiB, two mbarriers each, and the 1024-byte
/// alignment of the swizzle.
const STREAM_W8_SMEM: u32 = 8 * (16384 + 16) + 1024;

/// Whether W4's tiled GEMM beats streaming passes of 16 tokens at `m` tokens: each pass reads all
/// the weights, while the GEMM's time hardly depends on the tokens up to 128 (one row of tiles) but
/// on the SMs its work units (tiles, or parts of their k where they are few) keep busy. On the H100
/// it cost about 1.95 passes with every SM busy and proportionally more with fewer units, 1%
/// outliers: 4096x28672 (224 tiles) at 17 / 32 tokens 1.45-1.51x cuBLAS BF16 against the passes'
/// 1.30-1.44x; 14336x4096 (32 tiles in 4 parts) 1.39-1.41x against 1.36-1.53x, at 48 1.41-1.43x
/// against 0.94x; 4096x6144 (48 tiles in 2 parts) 1.06-1.09x against 1.29-1.42x, at 48 1.08-1.09x
/// against 0.87x.
fn w4_tiles_beat_passes((m, n): (usize, usize), k_tiles: usize, sm_count: usize) -> bool {
    let passes = m.div_ceil(GEMV_MAX_TOKENS) as f64;
    let tiles = tile_count(&TMA_W4, (m, n));
    let units = tiles * k_splits(&TMA_W4, tiles, k_tiles, sm_count);
    passes > 1.95 * sm_count as f64 / units.clamp(1, sm_count) as f64
}

/// Whether W4's streaming GEMV of `m` tokens copies the activations into shared memory: where each
/// block's copy serves at least 4 batches. With fewer, the copy ahead of the first stage cost more
/// than reading them through L1 at every stage (4096x6144: 10% slower at 8 tokens; 4096x28672:
/// 5-9% faster).
fn resident_pays(m: usize, n: usize, sm_count: usize) -> bool {
    let pairs_per_batch = if m > 8 { 2 } else { 1 };
    n.div_ceil(16) >= 4 * pairs_per_batch * sm_count
}

/// The GEMV streaming its weights through shared memory: a block per SM walking batches of pairs
/// of weight tiles (16 rows each), launched to start while the kernel before it finishes. Above 8
/// tokens a W4 batch holds two pairs, which share each load of the activations (M = 16: ~1.2x
/// faster on 4096 x 28672); `resident` copies W4's activations into shared memory where they fit.
fn gemv_stream(device: &CudaDevice, args: &GemmArgs, w4: bool, resident: bool) -> Result<()> {
    let pairs = (args.n as usize).div_ceil(16);
    let many = args.m > 8;
    // 8 consumer warps per 8 tokens and the producer warp.
    let threads = if many { 544 } else { 288 };
    let options = LaunchOptions { cluster: 1, early_start: true };
    let mut args = *args;
    if w4 {
        // Activation rows, tile pairs a batch, the static shared memory (the partial sums) and the
        // k of a stage (a piece of the resident activations, at most 8 pieces).
        let (rows, per_batch, partial, piece) = if many { (16, 2, 32768, 1024) } else { (8, 1, 8192, 2048) };
        // Resident, the activations lie beside a ring of 7 stages (and their 8 barriers).
        let resident_smem = 7 * STREAM_STAGE + 64 + rows * (args.k_pad as u32 + 16);
        let limit = SMEM_PER_BLOCK - partial;
        let fits = resident_smem <= limit && (args.k_pad as u32).div_ceil(piece) <= 8;
        let (name, smem, attribute) = match (many, resident && fits) {
            (true, true) => ("mixq_w4_stream16_resident", resident_smem, limit),
            (false, true) => ("mixq_w4_stream8_resident", resident_smem, limit),
            (true, false) => ("mixq_w4_stream16", STREAM_SMEM, STREAM_SMEM),
            (false, false) => ("mixq_w4_stream8", STREAM_SMEM, STREAM_SMEM),
        };
        // The resident kernels' shared memory varies with k: allowed up to the limit at load.
        let function = device.function(&MIXQ, name, attribute)?;
        let blocks = pairs.div_ceil(per_batch).min(device.sm_count() as usize) as u32;
        let mut params = [&mut args as *mut GemmArgs as *mut c_void];
        return launch_ex(device, &function, (blocks, threads), smem, options, &mut params);
    }
    // W8: a stage is 16 rows x 8 blocks of 128 k, one copy.
    let (n_pad, k_pad) = (round_up(args.n as usize, 8), args.k_pad as usize);
    let mut map = block_map(args.wq, (n_pad, k_pad), k_pad, (16, 8))?;
    let name = if many { "mixq_w8_stream16" } else { "mixq_w8_stream8" };
    let function = device.function(&MIXQ, name, STREAM_W8_SMEM)?;
    let blocks = pairs.min(device.sm_count() as usize) as u32;
    let mut params = [&mut map as *mut TensorMap as *mut c_void, &mut args as *mut GemmArgs as *mut c_void];
    launch_ex(device, &function, (blocks, threads), STREAM_W8_SMEM, options, &mut params)
}

/// Scalar arguments of the TMA kernels (`TmaArgs` in mixq.cu).
#[repr(C)]
struct TmaArgs {
    sx: u64,
    sw: u64,
    wz: u64,
    y: u64,
    m: i32,
    n: i32,
    k_tiles: i32,
    ko_tiles: i32,
    group_tiles: i32,
    staged: i32,
    splits: i32,
    split_pairs: i32,
    partial: u64,
    arrivals: u64,
}

/// A persistent TMA kernel: blocks per cluster, output tile width, shared memory (stages of a
/// 128-row activation tile and a `bn`-row weight tile, 128 bytes a row, the staged output's four
/// 64 x 64 f16 boxes, the 1024-byte alignment of the swizzle, and two mbarriers a stage) and
/// whether it can split k (the one-block kernels).
struct TmaKernel {
    name: &'static str,
    cluster: usize,
    bn: usize,
    smem: u32,
    splits_k: bool,
}

const fn tma_kernel(name: &'static str, cluster: usize, stages: u32, bn: usize) -> TmaKernel {
    let smem = stages * (128 + bn as u32) * 128 + 4 * 64 * 128 + 1024 + stages * 16;
    TmaKernel { name, cluster, bn, smem, splits_k: cluster == 1 }
}

const TMA_SINGLE: TmaKernel = tma_kernel("mixq_w8_tma", 1, 6, 128);
const TMA_NARROW: TmaKernel = tma_kernel("mixq_w8_tma_64", 1, 8, 64);
const TMA_PAIR_128: TmaKernel = tma_kernel("mixq_w8_tma_pair_128", 2, 6, 128);
const TMA_PAIR_192: TmaKernel = tma_kernel("mixq_w8_tma_pair_192", 2, 4, 192);
const TMA_PAIR_256: TmaKernel = tma_kernel("mixq_w8_tma_pair_256", 2, 4, 256);
/// W4: 4 stages, three unpacked 128 x 128 int8 weight tiles, each stage's scales and zero points
/// (640 bytes).
const TMA_W4: TmaKernel = TmaKernel {
    name: "mixq_w4_tma",
    cluster: 1,
    bn: 128,
    smem: tma_kernel("", 1, 4, 128).smem + 3 * 128 * 128 + 4 * 640,
    splits_k: true,
};

/// Output tiles of `kernel` for `m` x `n`.
fn tile_count(kernel: &TmaKernel, (m, n): (usize, usize)) -> usize {
    m.div_ceil(128 * kernel.cluster) * n.div_ceil(kernel.bn)
}

/// Parts each tile's `k_tiles` are split into, each a work unit: where the tiles leave at least
/// half the SMs idle (few tokens, where the weights' bytes are the cost and an SM alone cannot
/// pull its share at the GPU's rate), as many as one wave holds, each at least 8 k tiles long.
fn k_splits(kernel: &TmaKernel, tiles: usize, k_tiles: usize, sm_count: usize) -> usize {
    match kernel.splits_k {
        true => (sm_count / tiles.max(1)).min(k_tiles / 8).max(1),
        false => 1,
    }
}

/// Whether a tile's parts run as a cluster of two blocks that add their sums through distributed
/// shared memory instead of a workspace in L2: two parts of at least 32 k tiles each (14336x4096
/// at 96-128 tokens: 7% faster; with parts of 16 k tiles, 4096x6144's 128-column tiles up to 64
/// tokens, the clusters' barriers cost 2-3% more than the workspace's round trips).
fn split_pairs(splits: usize, k_tiles: usize) -> bool {
    splits == 2 && k_tiles >= 64
}

/// Of the tiles' waves over the GPU's clusters, the fraction that does work.
fn wave_efficiency(kernel: &TmaKernel, (m, n): (usize, usize), sm_count: usize) -> f64 {
    let tiles = tile_count(kernel, (m, n));
    let slots = sm_count / kernel.cluster;
    tiles as f64 / (tiles.div_ceil(slots) * slots) as f64
}

/// The pair kernel for `m` x `n`: the widest tiles (each loaded row feeds the most products)
/// unless narrower ones leave fewer clusters idle in the last wave (4096x6144 at 1024 tokens: 192
/// and 128 columns both fill 97%, and the 192-column tiles ran 3-4% faster).
fn widest_pair((m, n): (usize, usize), sm_count: usize) -> Kernel {
    let choices =
        [(Kernel::TmaPair256, &TMA_PAIR_256), (Kernel::TmaPair192, &TMA_PAIR_192), (Kernel::TmaPair128, &TMA_PAIR_128)];
    let efficiency = choices.map(|(_, k)| wave_efficiency(k, (m, n), sm_count));
    let best = efficiency.iter().copied().fold(0.0, f64::max);
    let at = efficiency.iter().position(|&e| e >= best - 0.02).unwrap_or(0);
    choices[at].0
}

/// The one-block kernel for `m` x `n`: W8's 64-column tiles where they fill more of the GPU than
/// 128-column ones (14336x4096 has 32 tiles of 128 columns for 132 SMs: 1.13x faster at 96 tokens,
/// 1.27x at 128). Below 96 tokens too, since two long parts of a tile add up in a cluster: at 17-80
/// tokens 14336x4096 ran 1.12-1.23x faster (64 tiles in 2 parts instead of 32 in 4 through the
/// workspace), 4096x6144 1.2-1.35x (96 tiles whole instead of 48 in 2). Compared by their tiles
/// alone: where both then split k into a full wave, the narrow tiles still won (14336x4096 at 128
/// tokens: 501 against 444 TOP/s).
fn single_width((m, n): (usize, usize), w4: bool, sm_count: usize) -> Kernel {
    let narrow = wave_efficiency(&TMA_NARROW, (m, n), sm_count);
    if !w4 && narrow > wave_efficiency(&TMA_SINGLE, (m, n), sm_count) + 0.02 {
        Kernel::TmaNarrow
    } else {
        Kernel::Tma
    }
}

/// Modelled time of `kernel` for `m` x `n` over `k_tiles`: its work units' waves over the GPU's
/// clusters, each as long as a unit's columns and k tiles at `speed` (an SM's rate with the
/// kernel's tiles relative to the 128x256 pairs').
fn modelled_time(kernel: &TmaKernel, speed: f64, (m, n): (usize, usize), k_tiles: usize, sm_count: usize) -> f64 {
    let tiles = tile_count(kernel, (m, n));
    let splits = k_splits(kernel, tiles, k_tiles, sm_count);
    let waves = (tiles * splits).div_ceil(sm_count / kernel.cluster);
    waves as f64 * kernel.bn as f64 / speed * (k_tiles / splits) as f64
}

/// The W8 kernel above 128 tokens: the pair kernel for the shape unless the one-block 128x128
/// kernel, whose tiles of 128 tokens waste fewer rows and fill the waves differently (splitting k
/// where its tiles are few), models 3% faster. 4096x28672 at 384 tokens: 1,005 against 935 TOP/s
/// (2 x 224 tiles of 256 rows, 7 waves, against 3 x 224 of 128 rows, 6 waves); 4096x6144 at 640:
/// 1,068 against 840; 14336x4096 at 256: 848 against 764. Not the 64-column tiles: they read the
/// activations twice as often, which a full GPU pays for (4096x28672 at 384: 820).
fn w8_tiling((m, n): (usize, usize), k_tiles: usize, sm_count: usize) -> Kernel {
    // Rates measured over whole waves on the H100 (M = 4096 for the pairs, 384-640 for one block).
    let speed = |choice| match choice {
        Kernel::TmaPair256 => 1.0,
        Kernel::TmaPair192 => 0.96,
        Kernel::TmaPair128 => 0.85,
        _ => 0.83,
    };
    let time = |choice| modelled_time(tma_kernel_of(choice, false), speed(choice), (m, n), k_tiles, sm_count);
    let pair = widest_pair((m, n), sm_count);
    if time(Kernel::Tma) < 0.97 * time(pair) {
        Kernel::Tma
    } else {
        pair
    }
}

fn tma_kernel_of(choice: Kernel, w4: bool) -> &'static TmaKernel {
    match choice {
        _ if w4 => &TMA_W4,
        Kernel::TmaPair128 => &TMA_PAIR_128,
        Kernel::TmaPair192 => &TMA_PAIR_192,
        Kernel::TmaPair256 => &TMA_PAIR_256,
        Kernel::TmaNarrow => &TMA_NARROW,
        _ => &TMA_SINGLE,
    }
}

fn gemm_tma(device: &CudaDevice, args: &GemmArgs, choice: Kernel, w4: bool) -> Result<()> {
    let (m, n, k_pad, ko_pad) = (args.m as usize, args.n as usize, args.k_pad as usize, args.ko_pad as usize);
    let sm_count = device.sm_count() as usize;
    let kernel = tma_kernel_of(choice, w4);
    let cluster = kernel.cluster;
    let n_pad = round_up(n, 8);
    // Each block of a cluster fetches its share of the weight tile's rows.
    let weight_rows = (kernel.bn / cluster) as u32;
    // The activations' rows up to the buffers' padding: no box reaches past them.
    let rows = round_up(m, ROW_PAD);
    let mut map_x = tile_map(args.xq, Element::U8, (rows, k_pad), k_pad, (128, 128), Layout::Swizzled128)?;
    let mut map_w = match w4 {
        // Packed W4: a row of words per 8-row tile, its 128-k slices (128 words each) in order; a
        // box is one slice of 16 tiles, 128 weight rows.
        true => {
            let slices = k_pad / K_TILE;
            tile_map(args.wq, Element::U32, (n_pad / 8, slices * 128), slices * 512, (16, 128), Layout::Dense)?
        }
        false => tile_map(args.wq, Element::U8, (n_pad, k_pad), k_pad, (weight_rows, 128), Layout::Swizzled128)?,
    };
    // Without outliers the kernel never reads these maps.
    let (mut map_xo, mut map_wo) = if ko_pad > 0 {
        (
            tile_map(args.xo, Element::F16, (rows, ko_pad), ko_pad * 2, (128, 64), Layout::Swizzled128)?,
            tile_map(args.wo, Element::F16, (n_pad, ko_pad), ko_pad * 2, (weight_rows, 64), Layout::Swizzled128)?,
        )
    } else {
        (map_x, map_w)
    };
    // The output leaves through shared memory by the copy engine where a map can describe it
    // (16-byte aligned rows), else straight from registers.
    let staged = n.is_multiple_of(8) && args.y.is_multiple_of(16);
    let mut map_y = match staged {
        true => tile_map(args.y, Element::F16, (m, n), n * 2, (64, 64), Layout::Swizzled128)?,
        false => map_x,
    };
    let k_tiles = k_pad / K_TILE;
    let tiles = tile_count(kernel, (m, n));
    let splits = k_splits(kernel, tiles, k_tiles, sm_count);
    // Split parts meet in a cluster (`split_pairs`) or in a workspace: each tile's two
    // warpgroups' arrival counters, then a 128 x bn f32 tile of sums per unit.
    let split_pairs = !w4 && split_pairs(splits, k_tiles);
    let (partial, arrivals) = match splits == 1 || split_pairs {
        true => (0, 0),
        false => {
            let counters = round_up(2 * tiles * 4, 256);
            let base = device.workspace("mixq split k", counters + tiles * splits * 128 * kernel.bn * 4)?;
            (base + counters as u64, base)
        }
    };
    let mut tma_args = TmaArgs {
        sx: args.sx,
        sw: args.sw,
        wz: args.wz,
        y: args.y,
        m: args.m,
        n: args.n,
        k_tiles: k_tiles as i32,
        ko_tiles: (ko_pad / OUTLIER_TILE) as i32,
        group_tiles: args.group_tiles,
        staged: staged as i32,
        splits: splits as i32,
        split_pairs: split_pairs as i32,
        partial,
        arrivals,
    };
    // Persistent: at most one block per SM, each walking its share of the work units (split
    // pairs: a cluster a tile, a unit a block).
    let (cluster, clusters) = match split_pairs {
        true => (2, tiles),
        false => (cluster, (tiles * splits).min(sm_count / cluster)),
    };
    let function = device.function(&MIXQ, kernel.name, kernel.smem)?;
    let mut params = [
        &mut map_x as *mut TensorMap as *mut c_void,
        &mut map_w as *mut TensorMap as *mut c_void,
        &mut map_xo as *mut TensorMap as *mut c_void,
        &mut map_wo as *mut TensorMap as *mut c_void,
        &mut map_y as *mut TensorMap as *mut c_void,
        &mut tma_args as *mut TmaArgs as *mut c_void,
    ];
    let options = LaunchOptions { cluster: cluster as u32, early_start: true };
    launch_ex(device, &function, ((cluster * clusters) as u32, 384), kernel.smem, options, &mut params)
}

fn launch_fill(device: &CudaDevice, name: &str, len: usize) -> Result<(cudarc::driver::CudaFunction, LaunchConfig)> {
    let blocks = len.div_ceil(256).clamp(1, 4 * 1024) as u32;
    Ok((
        device.function(&FILL, name, 0)?,
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 },
    ))
}

/// Uniform random bytes over the whole buffer.
pub fn fill_bytes<T: DeviceRepr>(device: &CudaDevice, out: &mut CudaSlice<T>, seed: u64) -> Result<()> {
    let len = out.num_bytes() as u64;
    let (function, config) = launch_fill(device, "fill_bytes", len as usize)?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(out).arg(&len).arg(&seed);
    unsafe { launch.launch(config) }?;
    Ok(())
}

/// Uniform f16 values in [-scale, scale) over the whole buffer (two bytes each).
pub fn fill_f16<T: DeviceRepr>(device: &CudaDevice, out: &mut CudaSlice<T>, seed: u64, scale: f32) -> Result<()> {
    let len = (out.num_bytes() / 2) as u64;
    let (function, config) = launch_fill(device, "fill_f16", len as usize)?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(out).arg(&len).arg(&seed).arg(&scale);
    unsafe { launch.launch(config) }?;
    Ok(())
}

/// Uniform bf16 values in [-scale, scale).
pub fn fill_bf16(device: &CudaDevice, out: &mut CudaSlice<half::bf16>, seed: u64, scale: f32) -> Result<()> {
    let len = out.len() as u64;
    let (function, config) = launch_fill(device, "fill_bf16", out.len())?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(out).arg(&len).arg(&seed).arg(&scale);
    unsafe { launch.launch(config) }?;
    Ok(())
}

/// Uniform f32 values in [lo, hi).
pub fn fill_f32_range(device: &CudaDevice, out: &mut CudaSlice<f32>, seed: u64, lo: f32, hi: f32) -> Result<()> {
    let len = out.len() as u64;
    let (function, config) = launch_fill(device, "fill_f32_range", out.len())?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(out).arg(&len).arg(&seed).arg(&lo).arg(&hi);
    unsafe { launch.launch(config) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The packers against the PTX ISA's fragment layouts: an emulated mma reads each lane's
    //! registers from the packed bytes as the kernels do and must reproduce a plain matmul.
    use super::*;
    use anyq_core::testing::XorShift;

    #[test]
    fn w8_rows_are_padded_with_zeros() {
        let q: Vec<i8> = (0..3 * 130).map(|i| (i % 251) as u8 as i8).collect();
        let packed = pack_w8(&q, 3, 130);
        assert_eq!(packed.len(), 8 * 256);
        for row in 0..8 {
            for col in 0..256 {
                let want = if row < 3 && col < 130 { q[row * 130 + col] as u8 } else { 0 };
                assert_eq!(packed[row * 256 + col], want, "({row}, {col})");
            }
        }
    }

    #[test]
    fn w4_slices_are_tile_interleaved_with_nibbles_in_fragment_order_and_zero_point_padding() {
        let (n, k) = (5, 300);
        let mut rng = XorShift::new(4);
        let q: Vec<u8> = rng.bytes(n * k).into_iter().map(|b| b & 15).collect();
        let zero = |row: usize| (row * 3 % 16) as u8;
        let packed = pack_w4(&q, n, k, |row, _| zero(row));
        let k_pad = 384;
        assert_eq!(packed.len(), 8 * k_pad / 2);
        for row in 0..n {
            for col in 0..k_pad {
                let byte = packed[col / 128 * 512 + row * 64 + col % 128 / 32 * 16 + col % 16];
                let got = if col % 32 < 16 { byte & 15 } else { byte >> 4 };
                let want = if col < k { q[row * k + col] } else { zero(row) };
                assert_eq!(got, want, "({row}, {col})");
            }
        }
    }

    #[test]
    fn f16_outlier_rows_are_padded_with_zeros() {
        let w: Vec<f16> = (0..10 * 37).map(|i| f16::from_f32(i as f32)).collect();
        let packed = pack_f16(&w, 10, 37, 64);
        assert_eq!(packed.len(), 16 * 64);
        assert_eq!(packed[64 + 36], w[37 + 36].to_bits());
        assert!(packed[64 + 37..128].iter().chain(&packed[10 * 64..]).all(|&b| b == 0));
    }

    #[test]
    fn the_pair_kernel_is_the_widest_whose_waves_fill_the_gpu() {
        // An H100's 132 SMs: 66 cluster slots.
        let pick = |m, n| widest_pair((m, n), 132);
        // 14336x4096 at 4096 tokens: 256 tiles of 128x256 fill 3.9 waves as well as 512 of 128x128.
        assert_eq!(pick(4096, 4096), Kernel::TmaPair256);
        // 4096x6144 at 512 tokens: 48 wide tiles leave 18 slots idle, 64 of 128x192 two.
        assert_eq!(pick(512, 6144), Kernel::TmaPair192);
        // 4096x6144 at 1024 tokens: 128 tiles of 128x192 fill 2 waves as well as 192 of 128x128.
        assert_eq!(pick(1024, 6144), Kernel::TmaPair192);
        // 4096x28672 at 512 tokens: 128x128 tiles (448 of them, 97% of 7 waves) over 128x256 (85%).
        assert_eq!(pick(512, 28672), Kernel::TmaPair128);
        assert!(wave_efficiency(&TMA_PAIR_128, (512, 28672), 132) > 0.95);
    }

    #[test]
    fn above_128_tokens_w8_takes_the_pairs_unless_one_block_tiles_model_faster() {
        let pick = |m, n, k: usize| w8_tiling((m, n), k / 128, 132);
        // Rows of 256 tokens half empty, or too few pair tiles: one-block tiles.
        assert_eq!(pick(384, 28672, 4096), Kernel::Tma);
        assert_eq!(pick(640, 6144, 4096), Kernel::Tma);
        assert_eq!(pick(256, 4096, 14336), Kernel::Tma);
        // Pairs wherever their waves are as full.
        assert_eq!(pick(512, 28672, 4096), Kernel::TmaPair128);
        assert_eq!(pick(640, 4096, 14336), Kernel::TmaPair192);
        assert_eq!(pick(1024, 6144, 4096), Kernel::TmaPair192);
        assert_eq!(pick(4096, 28672, 4096), Kernel::TmaPair256);
        assert_eq!(pick(4096, 4096, 14336), Kernel::TmaPair256);
    }

    #[test]
    fn up_to_128_tokens_w8_takes_64_column_tiles_where_they_fill_more_sms() {
        let pick = |m, n, w4| single_width((m, n), w4, 132);
        // 14336x4096: 64 narrow tiles (in 2 parts) against 32; 4096x6144: 96 against 48.
        for m in [17, 64, 128] {
            assert_eq!(pick(m, 4096, false), Kernel::TmaNarrow);
            assert_eq!(pick(m, 6144, false), Kernel::TmaNarrow);
        }
        // 4096x28672: 224 tiles of 128 columns fill the waves as well as 448 of 64. W4 has no
        // narrow kernel.
        assert_eq!(pick(64, 28672, false), Kernel::Tma);
        assert_eq!(pick(64, 4096, true), Kernel::Tma);
    }

    #[test]
    fn w4_takes_its_tiled_gemm_over_passes_of_16_tokens_where_it_models_faster() {
        let tiled = |m, n, k: usize| w4_tiles_beat_passes((m, n), k / 128, 132);
        // 4096x28672: 224 tiles fill the GPU; from 2 passes on.
        assert!(tiled(17, 28672, 4096));
        // 14336x4096: 32 tiles in 4 parts, 4096x6144: 48 in 2; from 3 passes on.
        for (n, k) in [(4096, 14336), (6144, 4096)] {
            assert!(!tiled(32, n, k));
            assert!(tiled(33, n, k));
        }
    }

    #[test]
    fn few_tiles_split_k_into_one_wave_of_parts() {
        // 14336x4096 at 64 tokens in 128 x 128 tiles: 32 of them and 112 k tiles: 4 parts, 128 units.
        assert_eq!(k_splits(&TMA_SINGLE, 32, 112, 132), 4);
        // 4096x6144 at 64 tokens in 128 x 128 tiles: 48 of them, 2 parts.
        assert_eq!(k_splits(&TMA_SINGLE, 48, 32, 132), 2);
        // Short k: parts of at least 8 k tiles.
        assert_eq!(k_splits(&TMA_SINGLE, 2, 20, 132), 2);
        assert_eq!(k_splits(&TMA_SINGLE, 2, 15, 132), 1);
        // W4's tiles split as W8's; tiles filling more than half the SMs and pair clusters do not.
        assert_eq!(k_splits(&TMA_W4, 32, 112, 132), 4);
        assert_eq!(k_splits(&TMA_SINGLE, 67, 112, 132), 1);
        assert_eq!(k_splits(&TMA_PAIR_128, 8, 112, 132), 1);
    }

    #[test]
    fn two_long_parts_add_through_a_cluster() {
        // 14336x4096 at 128 tokens: 64 tiles of 128 x 64, 2 parts of 56 k tiles.
        assert!(split_pairs(2, 112));
        // 4096x6144's 128 x 128 tiles at 64 tokens: 2 parts of 16 k tiles go through the workspace, as
        // do 4 parts.
        assert!(!split_pairs(2, 32));
        assert!(!split_pairs(4, 112));
    }
}
