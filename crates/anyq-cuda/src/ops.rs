//! Kernels of the FP16 model on the GPU (`kernels/model.cu`): embedding gather, RMSNorm (with the
//! residual add), RoPE on the fused QKV projection with the KV-cache append, SiLU·up and causal
//! attention with grouped KV heads. The linear layers are cuBLAS GEMMs ([`crate::BlasGemm`]).
//!
//! Activations read by GEMMs are f16 (`CudaSlice<f16>`, or the same values as raw bits where they
//! meet [`crate::mixq`]'s kernels: see [`F16Storage`]); the residual stream `x` and the deltas
//! added to it are f32. Every wrapper checks its shapes and returns [`CudaError::Shape`] for
//! buffers too small or shapes the kernels do not take, so no launch reads or writes outside
//! its buffers.
//!
//! Batched decode ([`rope_qkv_decode_batched`], [`attention_decode_batched`]) gives each sequence
//! a cache of its own: per layer `[sequences][capacity][kv_heads · head_dim]`, so sequence b's
//! position p is row `b · capacity + p`.
//!
//! Attention gives each (query, head) pair a warp; when the pairs are too few to keep the GPU
//! busy (decode of a few sequences), their keys are split over several warps whose partial
//! softmaxes a second kernel merges (flash-decoding), in an [`AttentionScratch`].

use anyq_core::cpu::{AttentionShape, Rope, RopeStyle};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;

use crate::compile::{kernel_source, KernelSource};
use crate::{CudaDevice, CudaError, Result};

pub(crate) const MODEL: KernelSource = kernel_source!("model");

/// Threads of the row kernels (embedding, RoPE).
const ROW_THREADS: u32 = 256;
/// Row elements a thread of the norms holds in registers (`NORM_ITEMS` in model.cu).
const NORM_ITEMS: usize = 4;
/// Warps per block of the attention kernels (`ATTN_WARPS` in model.cu), one (query, split, head)
/// each.
const ATTENTION_WARPS: usize = 4;
/// The largest head the attention kernels take: a row's 16-byte chunks, one per lane of a warp.
pub const MAX_HEAD_DIM: usize = 256;
/// Warps per SM that split attention aims for: a warp waits out a memory latency per tile of
/// keys, so an SM needs many of them in flight.
const ATTENTION_WARPS_PER_SM: usize = 16;
/// The fewest keys worth a warp of their own; the kernels split keys in multiples of it.
const ATTENTION_SPLIT_KEYS: usize = 32;

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for u16 {}
    impl Sealed for f32 {}
}

/// The element types of f16 activations: `half::f16`, or its bits as `u16`, which is how
/// [`crate::mixq`] types the buffers its producers read and its GEMMs write. The kernels read and
/// write both as IEEE binary16, so a model hands the same buffer to either.
pub trait F16Storage: DeviceRepr + sealed::Sealed {}
impl F16Storage for f16 {}
impl F16Storage for u16 {}

/// What [`add_residual`] adds to the f32 residual stream: f32, or f16 as either storage.
pub trait ResidualDelta: DeviceRepr + sealed::Sealed {
    #[doc(hidden)]
    const ADD_KERNEL: &'static str;
}
impl ResidualDelta for f32 {
    const ADD_KERNEL: &'static str = "model_add_f32";
}
impl ResidualDelta for f16 {
    const ADD_KERNEL: &'static str = "model_add_f16";
}
impl ResidualDelta for u16 {
    const ADD_KERNEL: &'static str = "model_add_f16";
}

fn shape_error(message: String) -> CudaError {
    CudaError::Shape(message)
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(shape_error(format!("{what} holds {got} elements, {want} are needed")));
    }
    Ok(())
}

/// A size as the kernels' `int`, or an error naming it.
fn as_int(what: &str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| shape_error(format!("{what} = {value} exceeds the kernels' 32-bit sizes")))
}

fn rows_config(rows: usize) -> Result<LaunchConfig> {
    let rows = u32::try_from(rows).map_err(|_| shape_error(format!("{rows} rows exceed one launch")))?;
    Ok(LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// One block per row, of enough threads that the row fits in their registers (`NORM_ITEMS` each,
/// float4 units when `dim` is a multiple of 4); longer rows loop with 1024 threads.
fn norm_config(rows: usize, dim: usize) -> Result<LaunchConfig> {
    let rows = u32::try_from(rows).map_err(|_| shape_error(format!("{rows} rows exceed one launch")))?;
    let units = if dim.is_multiple_of(4) { dim / 4 } else { dim };
    let threads = units.div_ceil(NORM_ITEMS).next_multiple_of(32).clamp(32, 1024) as u32;
    Ok(LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// Grid-stride launch over `total` elements: enough blocks to fill the GPU, no more.
fn elementwise_config(device: &CudaDevice, total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(ROW_THREADS as usize).min(device.sm_count() as usize * 8).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `x[r] = table[tokens[r]]` (f16 table `[vocab][dim]`, f32 rows) for the first `rows` tokens.
/// Ids must be below `vocab` (the model checks them): a larger one gives a row of NaNs.
pub fn embed(
    device: &CudaDevice,
    table: &CudaSlice<f16>,
    (vocab, dim): (usize, usize),
    tokens: &CudaSlice<u32>,
    rows: usize,
    x: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("embedding table", table.len(), vocab * dim)?;
    check_len("tokens", tokens.len(), rows)?;
    check_len("x", x.len(), rows * dim)?;
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let (vocab_i, dim_i) = (as_int("vocab", vocab)?, as_int("dim", dim)?);
    let function = device.function(&MODEL, "model_embed", 0)?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(table).arg(tokens).arg(&vocab_i).arg(&dim_i).arg(x);
    unsafe { launch.launch(rows_config(rows)?) }?;
    Ok(())
}

/// RMSNorm of `rows` rows of `x` (`[rows][dim]`, f32) into `out` (f16): `x / rms(x) · gamma`;
/// with a `delta` (f32, as `x`), the residual connection first, in the same pass: `x += delta`.
pub fn rms_norm(
    device: &CudaDevice,
    x: &mut CudaSlice<f32>,
    delta: Option<&CudaSlice<f32>>,
    gamma: &CudaSlice<f32>,
    eps: f32,
    (rows, dim): (usize, usize),
    out: &mut CudaSlice<f16>,
) -> Result<()> {
    check_len("x", x.len(), rows * dim)?;
    if let Some(delta) = delta {
        check_len("delta", delta.len(), rows * dim)?;
    }
    check_len("gamma", gamma.len(), dim)?;
    check_len("out", out.len(), rows * dim)?;
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let dim_i = as_int("dim", dim)?;
    let name = if delta.is_some() { "model_add_rms_norm" } else { "model_rms_norm" };
    let function = device.function(&MODEL, name, 0)?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(x);
    if let Some(delta) = delta {
        launch.arg(delta);
    }
    launch.arg(gamma).arg(&eps).arg(&dim_i).arg(out);
    unsafe { launch.launch(norm_config(rows, dim)?) }?;
    Ok(())
}

/// `act[r][j] = silu(gate[r][j]) · up[r][j]`, where row r of `gate_up` (`[rows][2 · ffn]`, the
/// fused gate/up projection) is `[gate | up]`.
pub fn silu_mul(
    device: &CudaDevice,
    gate_up: &CudaSlice<impl F16Storage>,
    (rows, ffn): (usize, usize),
    act: &mut CudaSlice<f16>,
) -> Result<()> {
    check_len("gate_up", gate_up.len(), rows * 2 * ffn)?;
    check_len("act", act.len(), rows * ffn)?;
    if rows == 0 || ffn == 0 {
        return Ok(());
    }
    let (rows_i, ffn_i) = (as_int("rows", rows)?, as_int("ffn", ffn)?);
    let function = device.function(&MODEL, "model_silu_mul", 0)?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(gate_up).arg(&rows_i).arg(&ffn_i).arg(act);
    unsafe { launch.launch(elementwise_config(device, rows * ffn)) }?;
    Ok(())
}

/// RoPE's inverse frequencies on the device, with the pair layout.
pub struct RopeFrequencies {
    style: RopeStyle,
    head_dim: usize,
    inv_freq: CudaSlice<f32>,
}

impl RopeFrequencies {
    /// The frequencies of a CPU [`Rope`] (per-frequency factors included), so that both devices
    /// rotate by the same f32 angles.
    pub fn new(device: &CudaDevice, rope: &Rope) -> Result<Self> {
        if rope.head_dim == 0 || !rope.head_dim.is_multiple_of(2) || rope.inv_freq().len() != rope.head_dim / 2 {
            return Err(shape_error(format!(
                "RoPE needs an even head size with one frequency per pair: head_dim {}, {} frequencies",
                rope.head_dim,
                rope.inv_freq().len()
            )));
        }
        Ok(Self { style: rope.style, head_dim: rope.head_dim, inv_freq: device.upload(rope.inv_freq())? })
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

/// Heads checked for what the kernels take: `heads` a multiple of `kv_heads`, `head_dim` a
/// multiple of 8 up to [`MAX_HEAD_DIM`].
fn check_heads(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Result<()> {
    if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(shape_error(format!("{n_heads} attention heads cannot share {n_kv_heads} KV heads evenly")));
    }
    if head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > MAX_HEAD_DIM {
        return Err(shape_error(format!(
            "head size {head_dim}: the GPU kernels take multiples of 8 up to {MAX_HEAD_DIM}"
        )));
    }
    Ok(())
}

/// Splits the fused QKV projection of `shape.queries` new tokens (`qkv`: `[queries][(heads +
/// 2 · kv_heads) · head_dim]`, rows `[q | k | v]`) at positions `shape.past..`: adds `bias` (`[(heads
/// + 2 · kv_heads) · head_dim]`, f32) if any, rotates q and k by RoPE, writes q
/// (`[queries][heads · head_dim]`) and appends k and v to the layer's caches (`[positions][kv_heads
/// · head_dim]`) at rows `past..past + queries`.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv(
    device: &CudaDevice,
    qkv: &CudaSlice<impl F16Storage>,
    bias: Option<&CudaSlice<f32>>,
    rope: &RopeFrequencies,
    shape: AttentionShape,
    q: &mut CudaSlice<f16>,
    k_cache: &mut CudaSlice<f16>,
    v_cache: &mut CudaSlice<f16>,
) -> Result<()> {
    let AttentionShape { queries, past, n_heads, n_kv_heads, head_dim } = shape;
    check_heads(n_heads, n_kv_heads, head_dim)?;
    as_int("positions", past + queries)?;
    let heads = (n_heads, n_kv_heads, head_dim);
    let at = RopePositions::After(as_int("past", past)?);
    launch_rope(device, qkv, bias, rope, (queries, past + queries), heads, at, (q, k_cache, v_cache))
}

/// Where the rows of a [`launch_rope`] go: after `past` positions of one sequence's cache, or
/// each at its sequence's position in a cache of `capacity` rows per sequence.
enum RopePositions<'a> {
    After(i32),
    Each { positions: &'a CudaSlice<u32>, capacity: i32 },
}

/// The checks and the launch that [`rope_qkv`] and [`rope_qkv_decode_batched`] share: `rows` rows
/// of `qkv` into q and caches of at least `cache_rows` rows.
#[allow(clippy::too_many_arguments)]
fn launch_rope(
    device: &CudaDevice,
    qkv: &CudaSlice<impl F16Storage>,
    bias: Option<&CudaSlice<f32>>,
    rope: &RopeFrequencies,
    (rows, cache_rows): (usize, usize),
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    positions: RopePositions,
    (q, k_cache, v_cache): (&mut CudaSlice<f16>, &mut CudaSlice<f16>, &mut CudaSlice<f16>),
) -> Result<()> {
    if rope.head_dim != head_dim {
        return Err(shape_error(format!("RoPE is for heads of {}, the shape has {head_dim}", rope.head_dim)));
    }
    let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
    let width = q_width + 2 * kv_width;
    check_len("qkv", qkv.len(), rows * width)?;
    if let Some(bias) = bias {
        check_len("qkv bias", bias.len(), width)?;
    }
    if let RopePositions::Each { positions, .. } = positions {
        check_len("positions", positions.len(), rows)?;
    }
    check_len("q", q.len(), rows * q_width)?;
    check_len("k cache", k_cache.len(), cache_rows * kv_width)?;
    check_len("v cache", v_cache.len(), cache_rows * kv_width)?;
    if rows == 0 {
        return Ok(());
    }
    let (heads_i, kv_heads_i, dim_i) =
        (as_int("heads", n_heads)?, as_int("kv heads", n_kv_heads)?, as_int("head_dim", head_dim)?);
    let neox = i32::from(rope.style == RopeStyle::Neox);
    // The kernel skips the bias where its pointer is null.
    let null = 0u64;
    let name = match positions {
        RopePositions::After(_) => "model_rope_qkv",
        RopePositions::Each { .. } => "model_rope_qkv_decode",
    };
    let function = device.function(&MODEL, name, 0)?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(qkv);
    match bias {
        Some(bias) => launch.arg(bias),
        None => launch.arg(&null),
    };
    launch.arg(&rope.inv_freq).arg(&heads_i).arg(&kv_heads_i).arg(&dim_i).arg(&neox);
    match &positions {
        RopePositions::After(past) => launch.arg(past),
        RopePositions::Each { positions, capacity } => launch.arg(*positions).arg(capacity),
    };
    launch.arg(q).arg(k_cache).arg(v_cache);
    unsafe { launch.launch(rows_config(rows)?) }?;
    Ok(())
}

/// How many warps share the keys of each (query, head) pair of an attention launch of `tasks`
/// pairs whose queries see at most `keys` keys: 1 when the pairs alone give the GPU
/// `ATTENTION_WARPS_PER_SM` warps per SM (large batches run as they are), else enough splits to
/// reach that, each of at least `ATTENTION_SPLIT_KEYS` keys.
pub fn attention_splits(device: &CudaDevice, tasks: usize, keys: usize) -> usize {
    (split_warps(device) / tasks.max(1)).min(keys.div_ceil(ATTENTION_SPLIT_KEYS)).max(1)
}

/// The warps that split attention aims for on `device`, and so the most parts it leaves.
fn split_warps(device: &CudaDevice) -> usize {
    device.sm_count() as usize * ATTENTION_WARPS_PER_SM
}

/// Where split attention leaves each split's part for the merge: its unnormalized output and
/// softmax statistics (`head_dim + 2` floats), and how many parts each pair has. Sized once per
/// device: keys are split only while pairs · splits stays within the warp target of
/// [`attention_splits`], so that many parts of the largest head always fit.
pub struct AttentionScratch {
    partials: CudaSlice<f32>,
    parts: CudaSlice<u32>,
}

impl AttentionScratch {
    /// The scratch for `device`: 2.2 MB on an H100.
    pub fn new(device: &CudaDevice) -> Result<Self> {
        let warps = split_warps(device);
        Ok(Self { partials: device.zeros(warps * (MAX_HEAD_DIM + 2))?, parts: device.zeros(warps)? })
    }

    /// [`attention_splits`], fewer where the parts would not fit (a scratch of another device).
    fn splits(&self, device: &CudaDevice, tasks: usize, keys: usize, head_dim: usize) -> usize {
        let fit = if tasks <= self.parts.len() { self.partials.len() / (tasks * (head_dim + 2)) } else { 0 };
        attention_splits(device, tasks, keys).min(fit).max(1)
    }
}

/// Launch of a split attention kernel: a warp per (query, split, head).
fn attention_config(tasks: usize, splits: usize) -> Result<LaunchConfig> {
    let warps = as_int("queries · heads · splits", tasks * splits)? as usize;
    Ok(LaunchConfig {
        grid_dim: (warps.div_ceil(ATTENTION_WARPS) as u32, 1, 1),
        block_dim: (32 * ATTENTION_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Merges the parts that a split attention launch of `splits` splits left in `scratch` into `out`
/// (`[tasks][head_dim]`); nothing to do for one split, which writes `out` itself.
fn combine_attention_splits(
    device: &CudaDevice,
    scratch: &AttentionScratch,
    (tasks, head_dim, splits): (usize, usize, usize),
    out: &mut CudaSlice<impl F16Storage>,
) -> Result<()> {
    if splits == 1 {
        return Ok(());
    }
    let (tasks_i, dim_i, splits_i) =
        (as_int("tasks", tasks)?, as_int("head_dim", head_dim)?, as_int("splits", splits)?);
    let function = device.function(&MODEL, "model_attention_combine", 0)?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(&scratch.partials).arg(&scratch.parts).arg(&tasks_i).arg(&dim_i).arg(&splits_i).arg(out);
    unsafe { launch.launch(attention_config(tasks, 1)?) }?;
    Ok(())
}

/// Causal attention of `shape.queries` new queries at positions `shape.past..` over the cached
/// keys and values (which already hold the new positions): `q` and `out` are `[queries][heads ·
/// head_dim]`, the caches `[positions][kv_heads · head_dim]`; query t sees keys `0..=past + t`,
/// and head h reads KV head `h / (heads / kv_heads)`. Scores are scaled by `1 / √head_dim`.
/// Few queries (decode of one sequence) split their keys over warps through `scratch`.
pub fn attention(
    device: &CudaDevice,
    q: &CudaSlice<f16>,
    k_cache: &CudaSlice<f16>,
    v_cache: &CudaSlice<f16>,
    shape: AttentionShape,
    scratch: &mut AttentionScratch,
    out: &mut CudaSlice<impl F16Storage>,
) -> Result<()> {
    let AttentionShape { queries, past, n_heads, n_kv_heads, head_dim } = shape;
    check_heads(n_heads, n_kv_heads, head_dim)?;
    let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
    check_len("q", q.len(), queries * q_width)?;
    check_len("out", out.len(), queries * q_width)?;
    check_len("k cache", k_cache.len(), (past + queries) * kv_width)?;
    check_len("v cache", v_cache.len(), (past + queries) * kv_width)?;
    if queries == 0 {
        return Ok(());
    }
    let tasks = as_int("queries · heads", queries * n_heads)? as usize;
    as_int("positions", past + queries)?;
    let (queries_i, past_i) = (as_int("queries", queries)?, as_int("past", past)?);
    let (heads_i, kv_heads_i, dim_i) =
        (as_int("heads", n_heads)?, as_int("kv heads", n_kv_heads)?, as_int("head_dim", head_dim)?);
    // As the CPU computes it.
    let scale = 1.0 / (head_dim as f32).sqrt();
    let splits = scratch.splits(device, tasks, past + queries, head_dim);
    let splits_i = as_int("splits", splits)?;
    let function = device.function(&MODEL, "model_attention", 0)?;
    let mut launch = device.stream().launch_builder(&function);
    launch
        .arg(q)
        .arg(k_cache)
        .arg(v_cache)
        .arg(&queries_i)
        .arg(&past_i)
        .arg(&heads_i)
        .arg(&kv_heads_i)
        .arg(&dim_i)
        .arg(&scale)
        .arg(&splits_i)
        .arg(&mut scratch.partials)
        .arg(&mut scratch.parts)
        .arg(&mut *out);
    unsafe { launch.launch(attention_config(tasks, splits)?) }?;
    combine_attention_splits(device, scratch, (tasks, head_dim, splits), out)
}

/// `x += delta` over `rows` rows of the residual stream (`[rows][dim]`, f32), for a sub-layer
/// whose output the next RMSNorm cannot add itself (MixQ's producers read `x` as it is, and its
/// GEMMs write f16).
pub fn add_residual<T: ResidualDelta>(
    device: &CudaDevice,
    x: &mut CudaSlice<f32>,
    delta: &CudaSlice<T>,
    (rows, dim): (usize, usize),
) -> Result<()> {
    check_len("x", x.len(), rows * dim)?;
    check_len("delta", delta.len(), rows * dim)?;
    if rows * dim == 0 {
        return Ok(());
    }
    let total = (rows * dim) as u64;
    let function = device.function(&MODEL, T::ADD_KERNEL, 0)?;
    let mut launch = device.stream().launch_builder(&function);
    launch.arg(x).arg(delta).arg(&total);
    unsafe { launch.launch(elementwise_config(device, rows * dim)) }?;
    Ok(())
}

/// One decode step of a batch: `sequences` sequences, one new token each at its own position,
/// each with a cache of `capacity` positions (see the module's note on the layout).
#[derive(Clone, Copy, Debug)]
pub struct DecodeShape {
    pub sequences: usize,
    pub capacity: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl DecodeShape {
    /// Checks the heads and the sizes the kernels index with 32-bit integers.
    fn check(&self) -> Result<()> {
        check_heads(self.n_heads, self.n_kv_heads, self.head_dim)?;
        as_int("capacity", self.capacity)?;
        as_int("sequences · heads", self.sequences * self.n_heads)?;
        as_int("q width", self.n_heads * self.head_dim)?;
        Ok(())
    }
}

/// [`rope_qkv`] for a batch: row b of `qkv` (`[sequences][(heads + 2 · kv_heads) · head_dim]`) is
/// sequence b's new token at `positions[b]`; q goes to row b of `q` (`[sequences][heads ·
/// head_dim]`), k and v to row `b · capacity + positions[b]` of the caches. Positions must be
/// below `capacity` (the model checks them): one that is not gives NaN queries and writes no cache
/// row.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv_decode_batched(
    device: &CudaDevice,
    qkv: &CudaSlice<impl F16Storage>,
    bias: Option<&CudaSlice<f32>>,
    rope: &RopeFrequencies,
    positions: &CudaSlice<u32>,
    shape: DecodeShape,
    q: &mut CudaSlice<f16>,
    k_cache: &mut CudaSlice<f16>,
    v_cache: &mut CudaSlice<f16>,
) -> Result<()> {
    shape.check()?;
    let DecodeShape { sequences, capacity, n_heads, n_kv_heads, head_dim } = shape;
    let at = RopePositions::Each { positions, capacity: as_int("capacity", capacity)? };
    let heads = (n_heads, n_kv_heads, head_dim);
    launch_rope(device, qkv, bias, rope, (sequences, sequences * capacity), heads, at, (q, k_cache, v_cache))
}

/// [`attention`] for a batch: sequence b's query (row b of `q`, `[sequences][heads · head_dim]`) at
/// `positions[b]` attends to keys `0..=positions[b]` of its own cache (rows `b · capacity..`),
/// which already holds the new one; `out` is `[sequences][heads · head_dim]`. Positions must be
/// below `capacity`: one that is not gives NaNs and reads nothing. Few sequences split their keys
/// over warps through `scratch`, as many as a position of `capacity - 1` would want; the kernel
/// spreads each sequence's own keys over them.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_batched(
    device: &CudaDevice,
    q: &CudaSlice<f16>,
    k_cache: &CudaSlice<f16>,
    v_cache: &CudaSlice<f16>,
    positions: &CudaSlice<u32>,
    shape: DecodeShape,
    scratch: &mut AttentionScratch,
    out: &mut CudaSlice<impl F16Storage>,
) -> Result<()> {
    shape.check()?;
    let DecodeShape { sequences, capacity, n_heads, n_kv_heads, head_dim } = shape;
    let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
    check_len("q", q.len(), sequences * q_width)?;
    check_len("out", out.len(), sequences * q_width)?;
    check_len("positions", positions.len(), sequences)?;
    check_len("k cache", k_cache.len(), sequences * capacity * kv_width)?;
    check_len("v cache", v_cache.len(), sequences * capacity * kv_width)?;
    if sequences == 0 {
        return Ok(());
    }
    let tasks = sequences * n_heads;
    let (capacity_i, sequences_i) = (as_int("capacity", capacity)?, as_int("sequences", sequences)?);
    let (heads_i, kv_heads_i, dim_i) =
        (as_int("heads", n_heads)?, as_int("kv heads", n_kv_heads)?, as_int("head_dim", head_dim)?);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let splits = scratch.splits(device, tasks, capacity, head_dim);
    let splits_i = as_int("splits", splits)?;
    let function = device.function(&MODEL, "model_attention_decode", 0)?;
    let mut launch = device.stream().launch_builder(&function);
    launch
        .arg(q)
        .arg(k_cache)
        .arg(v_cache)
        .arg(positions)
        .arg(&capacity_i)
        .arg(&sequences_i)
        .arg(&heads_i)
        .arg(&kv_heads_i)
        .arg(&dim_i)
        .arg(&scale)
        .arg(&splits_i)
        .arg(&mut scratch.partials)
        .arg(&mut scratch.parts)
        .arg(&mut *out);
    unsafe { launch.launch(attention_config(tasks, splits)?) }?;
    combine_attention_splits(device, scratch, (tasks, head_dim, splits), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_the_kernels_cannot_take_are_errors() {
        assert!(check_heads(9, 3, 64).is_ok());
        assert!(check_heads(8, 8, 256).is_ok());
        for (heads, kv_heads, d) in [(9, 2, 64), (4, 0, 64), (4, 2, 60), (4, 2, 264), (4, 2, 0)] {
            assert!(matches!(check_heads(heads, kv_heads, d), Err(CudaError::Shape(_))), "{heads}/{kv_heads} d {d}");
        }
        assert!(matches!(check_len("x", 3, 4), Err(CudaError::Shape(m)) if m.contains("x holds 3")));
        assert!(as_int("n", 1 << 40).is_err());
    }
}
