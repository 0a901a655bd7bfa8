//! The LLaMA architecture on an NVIDIA GPU in FP16: the CPU model's weights converted to f16 once,
//! every linear layer a cuBLAS GEMM, the rest `anyq_cuda::ops` kernels, and an f16 KV cache on the
//! device. It computes what [`LlamaModel`] computes, as a transformer in half precision does:
//! f16 weights and activations between kernels, f32 arithmetic inside them, and an f32 residual
//! stream (SmolLM2's MLP adds values above 20000 to it).
//!
//! Per layer: `normed` → QKV GEMM (q, k, v weights stacked) → RoPE, KV-cache append → attention
//! → o_proj GEMM (f32 out) → `x += ·`, RMSNorm → gate/up GEMM (stacked) → SiLU·up → down GEMM
//! (f32 out) → `x += ·`, the next RMSNorm.
//!
//! The same blocks run with MixQ linear layers ([`CudaLinear::Mixq`]: a CPU model's MixQ layers,
//! which [`CudaLlama::new`] converts through `crate::cuda_mixq`, or weights made on the device, for
//! [`CudaLlama::from_weights`]): MixQ's producers normalize (RMSNorm of `x`, SiLU·up of the gate/up
//! output, or nothing for the attention output) and quantize each input in one pass, and its GEMMs
//! write f16, added to `x` before the next producer reads it. Besides one sequence's prefill and
//! decode, [`CudaLlama::decode_step`] decodes one token for each of a batch of sequences, each
//! with a cache of its own ([`CudaBatchCache`]).

use std::sync::Arc;

use anyq_core::cpu::{AttentionShape, Rope};
use anyq_core::{DenseLinear, Linear};
use anyq_cuda::mixq::{self, MixqActivations, MixqWeight, OutlierSet, Producer};
use anyq_cuda::ops::{self, AttentionScratch, DecodeShape, RopeFrequencies};
use anyq_cuda::{BlasGemm, CudaDevice, CudaError, CudaSlice};
use anyq_quant::ggml_linear::GgmlLinear;
use anyq_quant::methods::mixq::MixQLinear;
use half::f16;

use crate::config::ModelConfig;
use crate::cuda_mixq::stack_mixq;
use crate::decoder::{Decoder, LOGIT_ROWS};
use crate::llama::{ForwardError, LlamaModel, LINEAR_MODULES};

/// Tokens per pass of a long prompt: its activations stay small whatever the prompt's length.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum CudaModelError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("{0}")]
    Unsupported(String),
}

/// A linear layer on the device, `y = x · Wᵀ` with `W` `[out, in]`.
pub enum CudaLinear {
    /// f16 weights `[n][k]`, row-major: a cuBLAS GEMM.
    Fp16 { weight: CudaSlice<f16>, n: usize, k: usize },
    /// MixQ: integer weights with f16 outlier columns, the input quantized by MixQ's producer,
    /// which counts the tokens with an activation above `threshold` outside the outlier channels
    /// (infinite: none is counted).
    Mixq { weight: MixqWeight, threshold: f32 },
}

impl CudaLinear {
    /// `(out, in)` features.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Self::Fp16 { n, k, .. } => (*n, *k),
            Self::Mixq { weight, .. } => weight.shape(),
        }
    }

    fn outliers(&self) -> Option<&Arc<OutlierSet>> {
        match self {
            Self::Fp16 { .. } => None,
            Self::Mixq { weight, .. } => Some(weight.outliers()),
        }
    }
}

/// One decoder block's weights on the device.
pub struct CudaLayer {
    /// RMSNorm weights `[hidden]` before attention and before the MLP.
    pub attn_norm: CudaSlice<f32>,
    pub mlp_norm: CudaSlice<f32>,
    /// `[q_width + 2 · kv_width, hidden]`: the q, k and v rows, one GEMM for the three.
    pub qkv: CudaLinear,
    /// `[q_width + 2 · kv_width]`, added before RoPE (Qwen2).
    pub qkv_bias: Option<CudaSlice<f32>>,
    /// `[hidden, q_width]`.
    pub o_proj: CudaLinear,
    /// `[2 · ffn, hidden]`: the gate rows, then the up rows.
    pub gate_up: CudaLinear,
    /// `[hidden, ffn]`.
    pub down: CudaLinear,
}

/// A model's weights on the device, for [`CudaLlama::from_weights`].
pub struct CudaWeights {
    /// `[vocab, hidden]`.
    pub embed: CudaSlice<f16>,
    /// `[vocab, hidden]`; `None` when tied to `embed`.
    pub lm_head: Option<CudaSlice<f16>>,
    pub layers: Vec<CudaLayer>,
    /// `[hidden]`.
    pub final_norm: CudaSlice<f32>,
}

pub struct CudaLlama {
    device: Arc<CudaDevice>,
    blas: BlasGemm,
    config: ModelConfig,
    /// `[vocab, hidden]`.
    embed: CudaSlice<f16>,
    /// `[vocab, hidden]`; `None` when tied to `embed`.
    lm_head: Option<CudaSlice<f16>>,
    layers: Vec<CudaLayer>,
    final_norm: CudaSlice<f32>,
    rope: RopeFrequencies,
}

/// One of the linear layers of a block.
type BlockLinear = fn(&CudaLayer) -> &CudaLinear;

/// The four linear layers of a block, with their names in errors.
const BLOCK_LINEARS: [(&str, BlockLinear); 4] = [
    ("q/k/v_proj", |l| &l.qkv),
    ("o_proj", |l| &l.o_proj),
    ("gate/up_proj", |l| &l.gate_up),
    ("down_proj", |l| &l.down),
];

/// Refuses head layouts the GPU kernels do not take.
fn check_heads(c: &ModelConfig) -> Result<(), CudaModelError> {
    if c.num_kv_heads == 0
        || !c.num_heads.is_multiple_of(c.num_kv_heads)
        || !c.head_dim.is_multiple_of(8)
        || c.head_dim > ops::MAX_HEAD_DIM
    {
        return Err(CudaModelError::Unsupported(format!(
            "{} heads over {} KV heads of size {}: the GPU kernels need whole groups and heads of a multiple of 8 up to {}",
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            ops::MAX_HEAD_DIM
        )));
    }
    Ok(())
}

/// f32 weights as f16; a value beyond f16's range is an error, not an infinity.
pub(crate) fn to_f16(name: &str, values: &[f32]) -> Result<Vec<f16>, CudaModelError> {
    let converted: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    if let Some(i) = converted.iter().zip(values).position(|(h, v)| h.is_infinite() && v.is_finite()) {
        return Err(CudaModelError::Unsupported(format!(
            "{name}: value {} at {i} is beyond f16's range (±65504)",
            values[i]
        )));
    }
    Ok(converted)
}

/// f32 weights as f16 on the device.
fn upload_f16(device: &CudaDevice, name: &str, values: &[f32]) -> Result<CudaSlice<f16>, CudaModelError> {
    Ok(device.upload(&to_f16(name, values)?)?)
}

/// What the GPU model runs, for the errors that refuse the rest.
pub(crate) const GPU_MODELS: &str = "only FP16 and MixQ models run on the GPU so far";

/// The dense f32 weight of a float layer (f32, or GGML blocks that anyq computes dequantized);
/// other quantized methods' layers compute something else (integer activations, ...) and are
/// refused.
fn float_weight(linear: &dyn Linear, name: &str) -> Result<Vec<f32>, CudaModelError> {
    let any = linear.as_any();
    if !(any.is::<DenseLinear>() || any.is::<GgmlLinear>()) {
        return Err(CudaModelError::Unsupported(format!(
            "{name} is quantized: {GPU_MODELS} (run it with --device cpu)"
        )));
    }
    Ok(linear.dense_weight())
}

/// The GPU layer of `parts`, the named modules that read one input (rows stacked in order):
/// MixQ when all of them are MixQ layers, FP16 when all are float layers; `name` is the stacked
/// layer's in errors.
fn block_linear(
    device: &CudaDevice,
    name: &str,
    parts: &[(String, &dyn Linear)],
) -> Result<CudaLinear, CudaModelError> {
    let mixq: Vec<(&str, &MixQLinear)> =
        parts.iter().filter_map(|(n, l)| Some((n.as_str(), l.as_any().downcast_ref::<MixQLinear>()?))).collect();
    if mixq.len() == parts.len() {
        return stack_mixq(&mixq)?.upload(device);
    }
    if let (Some((mixq_name, _)), Some((other, _))) =
        (mixq.first(), parts.iter().find(|(_, l)| !l.as_any().is::<MixQLinear>()))
    {
        return Err(CudaModelError::Unsupported(format!(
            "{name}: {mixq_name} is MixQ but {other} is not: the GPU runs them as one layer"
        )));
    }
    let weights = parts.iter().map(|(n, l)| float_weight(*l, n)).collect::<Result<Vec<_>, _>>()?.concat();
    let n = parts.iter().map(|(_, l)| l.out_features()).sum();
    let k = parts.first().map_or(0, |(_, l)| l.in_features());
    Ok(CudaLinear::Fp16 { weight: upload_f16(device, name, &weights)?, n, k })
}

impl CudaLlama {
    /// Uploads `model`'s weights: float layers as f16, MixQ layers as MixQ's (each block's q/k/v
    /// and gate/up with the union of their outlier channels: see `crate::cuda_mixq`). Refuses
    /// other quantized layers and shapes the GPU kernels do not take.
    pub fn new(device: &Arc<CudaDevice>, model: &LlamaModel) -> Result<Self, CudaModelError> {
        let c = model.config.clone();
        let (h, q_width, kv_width) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        check_heads(&c)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        // (out, in) of each module of LINEAR_MODULES.
        let ffn = c.intermediate_size;
        let shapes = [(q_width, h), (kv_width, h), (kv_width, h), (h, q_width), (ffn, h), (ffn, h), (h, ffn)];
        for i in 0..c.num_layers {
            let mut linears: Vec<(String, &dyn Linear)> = Vec::with_capacity(LINEAR_MODULES.len());
            for (m, (module, (n, k))) in LINEAR_MODULES.iter().zip(shapes).enumerate() {
                let name = format!("layer {i} {module}");
                let linear =
                    model.linear(i, module).ok_or_else(|| CudaModelError::Unsupported(format!("no {name}")))?;
                if (linear.out_features(), linear.in_features()) != (n, k) {
                    return Err(CudaModelError::Unsupported(format!(
                        "{name}: expected [{n}, {k}], got [{}, {}]",
                        linear.out_features(),
                        linear.in_features()
                    )));
                }
                // Only q, k and v have biases in the LLaMA family (Qwen2).
                match linear.bias() {
                    Some(bias) if m >= 3 || bias.len() != n => {
                        return Err(CudaModelError::Unsupported(format!("{name}: the GPU model takes no bias here")));
                    }
                    _ => {}
                }
                linears.push((name, linear));
            }
            let qkv_bias = match linears[..3].iter().all(|(_, l)| l.bias().is_none()) {
                true => None,
                false => {
                    let bias: Vec<f32> = linears[..3]
                        .iter()
                        .zip(&shapes)
                        .flat_map(|((_, l), &(n, _))| l.bias().map_or_else(|| vec![0.0; n], <[f32]>::to_vec))
                        .collect();
                    Some(device.upload(&bias)?)
                }
            };
            let (attn_norm, mlp_norm) = model.block_norms(i).expect("layer i < num_layers");
            let stacked = |name: &str, parts| block_linear(device, &format!("layer {i} {name}"), parts);
            layers.push(CudaLayer {
                attn_norm: device.upload(attn_norm)?,
                mlp_norm: device.upload(mlp_norm)?,
                qkv: stacked("q/k/v_proj", &linears[..3])?,
                qkv_bias,
                o_proj: stacked("o_proj", &linears[3..4])?,
                gate_up: stacked("gate/up_proj", &linears[4..6])?,
                down: stacked("down_proj", &linears[6..])?,
            });
        }
        let embed = upload_f16(device, "embed_tokens", &float_weight(model.embed_tokens(), "embed_tokens")?)?;
        let lm_head = match c.tie_word_embeddings {
            true => None,
            false => Some(upload_f16(device, "lm_head", &float_weight(model.lm_head(), "lm_head")?)?),
        };
        let final_norm = device.upload(model.final_norm())?;
        Self::from_weights(device, c, CudaWeights { embed, lm_head, layers, final_norm })
    }

    /// A model from weights already on the device (FP16 or MixQ linear layers, in any mix), checked
    /// against `config`'s shapes. MixQ layers may have outlier channels of their own: a forward
    /// pass quantizes each input into a buffer for its set, which layers with the same channels
    /// share.
    pub fn from_weights(
        device: &Arc<CudaDevice>,
        config: ModelConfig,
        weights: CudaWeights,
    ) -> Result<Self, CudaModelError> {
        let c = config;
        check_heads(&c)?;
        let (h, ffn, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let wrong = |what: String| Err(CudaModelError::Unsupported(what));
        if weights.layers.len() != c.num_layers {
            return wrong(format!("{} layers of weights for a model of {}", weights.layers.len(), c.num_layers));
        }
        if weights.embed.len() != vocab * h {
            return wrong(format!(
                "embed_tokens holds {} values, [{vocab}, {h}] needs {}",
                weights.embed.len(),
                vocab * h
            ));
        }
        match (&weights.lm_head, c.tie_word_embeddings) {
            (Some(head), false) if head.len() == vocab * h => {}
            (None, true) => {}
            (Some(head), false) => {
                return wrong(format!("lm_head holds {} values, [{vocab}, {h}] needs {}", head.len(), vocab * h))
            }
            (_, tied) => return wrong(format!("the config says tied embeddings: {tied}, the weights disagree")),
        }
        if weights.final_norm.len() != h {
            return wrong(format!("the final norm holds {} values, not {h}", weights.final_norm.len()));
        }
        let shapes = [(q_width + 2 * kv_width, h), (h, q_width), (2 * ffn, h), (h, ffn)];
        for (i, layer) in weights.layers.iter().enumerate() {
            for (norm, name) in [(&layer.attn_norm, "input norm"), (&layer.mlp_norm, "post-attention norm")] {
                if norm.len() != h {
                    return wrong(format!("layer {i} {name} holds {} values, not {h}", norm.len()));
                }
            }
            if let Some(bias) = &layer.qkv_bias {
                if bias.len() != q_width + 2 * kv_width {
                    return wrong(format!(
                        "layer {i} q/k/v bias holds {} values, not {}",
                        bias.len(),
                        q_width + 2 * kv_width
                    ));
                }
            }
            for ((name, linear), (n, k)) in BLOCK_LINEARS.iter().zip(shapes) {
                let (got_n, got_k) = linear(layer).shape();
                if (got_n, got_k) != (n, k) {
                    return wrong(format!("layer {i} {name}: expected [{n}, {k}], got [{got_n}, {got_k}]"));
                }
            }
        }
        let rope = Rope::new(c.rope_style, c.head_dim, c.rope_theta, c.rope_freq_factors.as_deref());
        Ok(Self {
            device: device.clone(),
            blas: BlasGemm::new(device)?,
            rope: RopeFrequencies::new(device, &rope)?,
            config: c,
            embed: weights.embed,
            lm_head: weights.lm_head,
            layers: weights.layers,
            final_norm: weights.final_norm,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// An empty KV cache for up to `capacity` positions (at most the model's context), with the
    /// activations' buffers of one sequence.
    pub fn new_cache(&self, capacity: usize) -> Result<CudaKvCache, CudaModelError> {
        let c = &self.config;
        if capacity == 0 || capacity > c.max_position_embeddings {
            return Err(CudaModelError::Unsupported(format!(
                "a KV cache of {capacity} positions: the model's context holds 1 to {}",
                c.max_position_embeddings
            )));
        }
        let kv_width = c.num_kv_heads * c.head_dim;
        let (keys, values) = (0..c.num_layers)
            .map(|_| Ok((self.device.zeros(capacity * kv_width)?, self.device.zeros(capacity * kv_width)?)))
            .collect::<Result<Vec<_>, CudaError>>()?
            .into_iter()
            .unzip();
        Ok(CudaKvCache {
            keys,
            values,
            len: 0,
            capacity,
            kv_width,
            scratch: Scratch::new(self, PREFILL_CHUNK.min(capacity), LOGIT_ROWS)?,
        })
    }

    /// A decoder over a new cache of `capacity` positions.
    pub fn decoder(&self, capacity: usize) -> Result<CudaDecoder<'_>, CudaModelError> {
        Ok(CudaDecoder { model: self, cache: self.new_cache(capacity)? })
    }

    /// MixQ's threshold counts over the forward passes that `cache` has run since it was made;
    /// `None` for a model without MixQ layers.
    pub fn mixq_counts(&self, cache: &CudaKvCache) -> Result<Option<MixqCounts>, CudaModelError> {
        Ok(cache.scratch.mixq.counts(&self.device)?)
    }

    /// Runs `tokens` at the positions after those in `cache`, appends their keys and values to
    /// it and returns the logits `[vocab]` of the last one: [`LlamaModel::forward_last`] on the
    /// GPU. Prompts longer than [`PREFILL_CHUNK`] run in chunks of it, each attending to the
    /// chunks before it through the cache; should a chunk fail, the cache keeps those before.
    pub fn forward_last(&self, tokens: &[u32], cache: &mut CudaKvCache) -> Result<Vec<f32>, CudaModelError> {
        self.check_tokens(tokens, cache)?;
        let mut last_rows = 0;
        for chunk in tokens.chunks(cache.scratch.rows) {
            self.forward_chunk(chunk, cache)?;
            last_rows = chunk.len();
        }
        self.logits_of_rows(&mut cache.scratch, last_rows - 1, 1)
    }

    /// What the CPU model checks before a forward pass, against the cache's capacity.
    fn check_tokens(&self, tokens: &[u32], cache: &CudaKvCache) -> Result<(), CudaModelError> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(ForwardError::Empty.into());
        }
        if cache.keys.len() != c.num_layers || cache.kv_width != c.num_kv_heads * c.head_dim {
            return Err(CudaError::Shape("the KV cache was made for another model".into()).into());
        }
        let needed = cache.len + tokens.len();
        if needed > cache.capacity {
            return Err(ForwardError::ContextExceeded { needed, max: cache.capacity }.into());
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(ForwardError::TokenOutOfRange { id, vocab: c.vocab_size }.into());
        }
        Ok(())
    }

    /// [`Self::forward_last`], handing the logits `[vocab]` of every token to `on_logits` with
    /// its index in `tokens`, in order.
    pub fn forward_all(
        &self,
        tokens: &[u32],
        cache: &mut CudaKvCache,
        on_logits: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), CudaModelError> {
        self.check_tokens(tokens, cache)?;
        let vocab = self.config.vocab_size;
        for (c, chunk) in tokens.chunks(cache.scratch.rows).enumerate() {
            self.forward_chunk(chunk, cache)?;
            for first in (0..chunk.len()).step_by(LOGIT_ROWS) {
                let rows = LOGIT_ROWS.min(chunk.len() - first);
                let logits = self.logits_of_rows(&mut cache.scratch, first, rows)?;
                for (r, row) in logits.chunks_exact(vocab).enumerate() {
                    on_logits(c * cache.scratch.rows + first + r, row);
                }
            }
        }
        Ok(())
    }

    /// The logits of rows `first..first + rows` (at most `LOGIT_ROWS`) of the last chunk's
    /// final-norm output, `[rows, vocab]` on the host.
    fn logits_of_rows(&self, s: &mut Scratch, first: usize, rows: usize) -> Result<Vec<f32>, CudaModelError> {
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        debug_assert!(rows <= LOGIT_ROWS && first + rows <= s.rows);
        // The GEMM reads its rows from the start of a buffer of their own.
        let hidden = s.normed.slice(first * h..(first + rows) * h);
        self.device.stream().memcpy_dtod(&hidden, &mut s.logit_input).map_err(CudaError::from)?;
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.blas.f16_to_f32(&s.logit_input, lm_head, &mut s.logits, (rows, vocab, h))?;
        Ok(self.device.stream().clone_dtoh(&s.logits.slice(..rows * vocab)).map_err(CudaError::from)?)
    }

    /// One chunk of at most `scratch.rows` tokens through every layer; leaves the final norm's
    /// output in `scratch.normed`.
    fn forward_chunk(&self, tokens: &[u32], cache: &mut CudaKvCache) -> Result<(), CudaModelError> {
        let c = &self.config;
        let dev = self.device.as_ref();
        let t = tokens.len();
        let shape = AttentionShape {
            queries: t,
            past: cache.len,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let CudaKvCache { keys, values, scratch: s, len, .. } = cache;
        self.device.stream().memcpy_htod(tokens, &mut s.tokens).map_err(CudaError::from)?;
        ops::embed(dev, &self.embed, (c.vocab_size, c.hidden_size), &s.tokens, t, &mut s.x)?;
        self.run_blocks(s, t, |i, layer, io| {
            let (keys, values) = (&mut keys[i], &mut values[i]);
            ops::rope_qkv(dev, io.qkv, layer.qkv_bias.as_ref(), &self.rope, shape, io.q, keys, values)?;
            ops::attention(dev, io.q, keys, values, shape, io.scratch, io.out)?;
            Ok(())
        })?;
        *len += t;
        Ok(())
    }

    /// Every block over the `rows` tokens whose embeddings are in `s.x`, then the final RMSNorm
    /// into `s.normed`. `attention(i, layer, io)` runs block i's attention: it reads the QKV
    /// projection `io.qkv`, keeps the keys and values in its cache and writes `io.out`.
    fn run_blocks(
        &self,
        s: &mut Scratch,
        rows: usize,
        mut attention: impl FnMut(usize, &CudaLayer, AttentionIo<'_>) -> Result<(), CudaModelError>,
    ) -> Result<(), CudaModelError> {
        let Scratch { x, normed, qkv, q, attn, attention_scratch, delta, delta_half, gate_up, act, mixq, .. } = s;
        let mut r = Residual { x, delta, delta_half, pending: Pending::Nothing, rows };
        for (i, layer) in self.layers.iter().enumerate() {
            let inputs = mixq.of_block[i];
            mixq.rows += (rows * inputs.iter().flatten().count()) as u64;
            let [qkv_in, o_proj_in, gate_up_in, down_in] = inputs;
            self.linear_of_norm(&mut r, &layer.attn_norm, &layer.qkv, normed, mixq.buffer(qkv_in), qkv)?;
            attention(i, layer, AttentionIo { qkv, q, scratch: attention_scratch, out: attn })?;
            self.linear_to_residual(&mut r, &layer.o_proj, SubLayerInput::Plain(attn), mixq.buffer(o_proj_in))?;
            self.linear_of_norm(&mut r, &layer.mlp_norm, &layer.gate_up, normed, mixq.buffer(gate_up_in), gate_up)?;
            let input = SubLayerInput::SiluMul { gate_up, act };
            self.linear_to_residual(&mut r, &layer.down, input, mixq.buffer(down_in))?;
        }
        self.norm(&mut r, &self.final_norm, normed)
    }

    /// `normed = x / rms(x) · gamma`, once the pending output is in `x` (added in the same pass
    /// when it is f32).
    fn norm(
        &self,
        r: &mut Residual,
        gamma: &CudaSlice<f32>,
        normed: &mut CudaSlice<f16>,
    ) -> Result<(), CudaModelError> {
        let (dev, eps, dims) = (self.device.as_ref(), self.config.rms_norm_eps, (r.rows, self.config.hidden_size));
        match r.pending {
            Pending::F32 => ops::rms_norm(dev, r.x, Some(r.delta), gamma, eps, dims, normed)?,
            Pending::F16 => {
                ops::add_residual(dev, r.x, r.delta_half, dims)?;
                ops::rms_norm(dev, r.x, None, gamma, eps, dims, normed)?;
            }
            Pending::Nothing => ops::rms_norm(dev, r.x, None, gamma, eps, dims, normed)?,
        }
        r.pending = Pending::Nothing;
        Ok(())
    }

    /// Adds the pending output to `x`.
    fn settle(&self, r: &mut Residual) -> Result<(), CudaModelError> {
        let (dev, dims) = (self.device.as_ref(), (r.rows, self.config.hidden_size));
        match r.pending {
            Pending::F32 => ops::add_residual(dev, r.x, r.delta, dims)?,
            Pending::F16 => ops::add_residual(dev, r.x, r.delta_half, dims)?,
            Pending::Nothing => {}
        }
        r.pending = Pending::Nothing;
        Ok(())
    }

    /// `out = linear(x / rms(x) · gamma)` (`[rows, n]`): FP16 layers normalize into `normed` for
    /// the GEMM, MixQ's producer normalizes and quantizes `x` in one pass.
    fn linear_of_norm(
        &self,
        r: &mut Residual,
        gamma: &CudaSlice<f32>,
        linear: &CudaLinear,
        normed: &mut CudaSlice<f16>,
        acts: Option<&mut MixqActivations>,
        out: &mut CudaSlice<u16>,
    ) -> Result<(), CudaModelError> {
        let dev = self.device.as_ref();
        match linear {
            CudaLinear::Fp16 { weight, n, k } => {
                self.norm(r, gamma, normed)?;
                self.blas.f16(normed, weight, out, (r.rows, *n, *k))?;
            }
            CudaLinear::Mixq { weight, threshold } => {
                self.settle(r)?;
                let acts = acts.ok_or_else(missing_mixq_buffer)?;
                let producer = Producer::RmsNorm { x: r.x, gamma, eps: self.config.rms_norm_eps };
                acts.produce(dev, producer, r.rows, *threshold)?;
                mixq::gemm(dev, weight, acts, out)?;
            }
        }
        Ok(())
    }

    /// Runs `linear` on `input` and leaves its output (`[rows, hidden]`) pending for `x`.
    fn linear_to_residual(
        &self,
        r: &mut Residual,
        linear: &CudaLinear,
        input: SubLayerInput,
        acts: Option<&mut MixqActivations>,
    ) -> Result<(), CudaModelError> {
        debug_assert!(r.pending == Pending::Nothing, "a sub-layer output would overwrite one not yet added");
        let dev = self.device.as_ref();
        match linear {
            CudaLinear::Fp16 { weight, n, k } => {
                let dims = (r.rows, *n, *k);
                match input {
                    SubLayerInput::Plain(x) => self.blas.f16_to_f32(x, weight, r.delta, dims)?,
                    SubLayerInput::SiluMul { gate_up, act } => {
                        ops::silu_mul(dev, gate_up, (r.rows, *k), act)?;
                        self.blas.f16_to_f32(act, weight, r.delta, dims)?;
                    }
                }
                r.pending = Pending::F32;
            }
            CudaLinear::Mixq { weight, threshold } => {
                let acts = acts.ok_or_else(missing_mixq_buffer)?;
                let producer = match input {
                    SubLayerInput::Plain(x) => Producer::Plain { x },
                    SubLayerInput::SiluMul { gate_up, .. } => Producer::SiluMul { gate_up },
                };
                acts.produce(dev, producer, r.rows, *threshold)?;
                mixq::gemm(dev, weight, acts, r.delta_half)?;
                r.pending = Pending::F16;
            }
        }
        Ok(())
    }
}

fn missing_mixq_buffer() -> CudaModelError {
    CudaModelError::Unsupported(
        "a MixQ layer without its activation buffer: the scratch was made for another model".into(),
    )
}

/// The buffers block attention reads and writes.
struct AttentionIo<'a> {
    /// The QKV projection `[rows, q_width + 2 · kv_width]`.
    qkv: &'a CudaSlice<u16>,
    /// Room for the rotated queries `[rows, q_width]`.
    q: &'a mut CudaSlice<f16>,
    scratch: &'a mut AttentionScratch,
    /// The attention output `[rows, q_width]`.
    out: &'a mut CudaSlice<u16>,
}

/// What the o_proj and down layers read.
enum SubLayerInput<'a> {
    /// f16 rows as they are (the attention output).
    Plain(&'a CudaSlice<u16>),
    /// SiLU(gate) · up of the gate/up projection's rows `[gate | up]`; FP16 layers compute it into
    /// `act`, MixQ's producer on the fly.
    SiluMul { gate_up: &'a CudaSlice<u16>, act: &'a mut CudaSlice<f16> },
}

/// A sub-layer output not yet added to the residual stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Nothing,
    /// In `delta` (FP16 layers): the next RMSNorm adds it in its own pass over `x`.
    F32,
    /// In `delta_half` (MixQ layers).
    F16,
}

/// The residual stream of `rows` tokens and the sub-layer output pending for it.
struct Residual<'a> {
    x: &'a mut CudaSlice<f32>,
    delta: &'a mut CudaSlice<f32>,
    delta_half: &'a mut CudaSlice<u16>,
    pending: Pending,
    rows: usize,
}

/// Keys and values of every layer for one sequence on the device, `[capacity, kv_heads ·
/// head_dim]` f16 per layer, with the buffers its forward passes work in.
pub struct CudaKvCache {
    keys: Vec<CudaSlice<f16>>,
    values: Vec<CudaSlice<f16>>,
    len: usize,
    capacity: usize,
    kv_width: usize,
    scratch: Scratch,
}

impl CudaKvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets positions from `len` on (the rows stay allocated and are overwritten).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// Keys and values of a batch of sequences on the device, each with `capacity` positions of its
/// own: per layer `[batch][capacity][kv_heads · head_dim]` f16, sequence b's position p at row
/// `b · capacity + p`. It depends only on the model's shape: models of one shape (FP16 and MixQ)
/// can share it.
pub struct CudaBatchCache {
    keys: Vec<CudaSlice<f16>>,
    values: Vec<CudaSlice<f16>>,
    batch: usize,
    capacity: usize,
    kv_width: usize,
}

impl CudaBatchCache {
    /// Zeroed caches for `batch` sequences of up to `capacity` positions each (at most the model's
    /// context).
    pub fn new(
        device: &CudaDevice,
        config: &ModelConfig,
        batch: usize,
        capacity: usize,
    ) -> Result<Self, CudaModelError> {
        let c = config;
        if batch == 0 {
            return Err(CudaModelError::Unsupported("a batch cache needs at least one sequence".into()));
        }
        if capacity == 0 || capacity > c.max_position_embeddings {
            return Err(CudaModelError::Unsupported(format!(
                "a KV cache of {capacity} positions: the model's context holds 1 to {}",
                c.max_position_embeddings
            )));
        }
        let kv_width = c.num_kv_heads * c.head_dim;
        let len = batch * capacity * kv_width;
        let (keys, values) = (0..c.num_layers)
            .map(|_| Ok((device.zeros(len)?, device.zeros(len)?)))
            .collect::<Result<Vec<_>, CudaError>>()?
            .into_iter()
            .unzip();
        Ok(Self { keys, values, batch, capacity, kv_width })
    }

    /// Device bytes of the caches of `batch` sequences of `capacity` positions.
    pub fn bytes_for(config: &ModelConfig, batch: usize, capacity: usize) -> usize {
        config.num_layers * 2 * batch * capacity * config.num_kv_heads * config.head_dim * 2
    }

    /// Sequences held.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Positions per sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets every position of every sequence to uniform random values in `[-scale, scale)`: a
    /// context without a prefill, for benchmarks.
    pub fn fill_random(&mut self, device: &CudaDevice, seed: u64, scale: f32) -> Result<(), CudaModelError> {
        for (i, (keys, values)) in self.keys.iter_mut().zip(&mut self.values).enumerate() {
            mixq::fill_f16(device, keys, seed.wrapping_add(2 * i as u64), scale)?;
            mixq::fill_f16(device, values, seed.wrapping_add(2 * i as u64 + 1), scale)?;
        }
        Ok(())
    }
}

/// One decode step's inputs and activations for up to `max_sequences` sequences: each one's token
/// and position on the device and, after [`CudaLlama::decode_step`], its logits.
pub struct CudaDecodeBatch {
    scratch: Scratch,
    positions: CudaSlice<u32>,
    sequences: usize,
    /// The largest position of the inputs, checked against the cache at each step.
    max_position: usize,
    vocab: usize,
}

impl CudaDecodeBatch {
    /// Sequences of the current inputs.
    pub fn sequences(&self) -> usize {
        self.sequences
    }

    pub fn max_sequences(&self) -> usize {
        self.scratch.rows
    }

    /// The last step's logits `[vocab]` of sequence `b`.
    pub fn logits(&self, device: &CudaDevice, b: usize) -> Result<Vec<f32>, CudaModelError> {
        if b >= self.sequences {
            return Err(CudaModelError::Unsupported(format!("sequence {b} of a batch of {}", self.sequences)));
        }
        let row = self.scratch.logits.slice(b * self.vocab..(b + 1) * self.vocab);
        Ok(device.stream().clone_dtoh(&row).map_err(CudaError::from)?)
    }
}

impl CudaLlama {
    /// Buffers for decode steps of up to `max_sequences` sequences at a time.
    pub fn new_decode_batch(&self, max_sequences: usize) -> Result<CudaDecodeBatch, CudaModelError> {
        if max_sequences == 0 {
            return Err(CudaModelError::Unsupported("a decode batch needs at least one sequence".into()));
        }
        Ok(CudaDecodeBatch {
            scratch: Scratch::new(self, max_sequences, max_sequences)?,
            positions: self.device.zeros(max_sequences)?,
            sequences: 0,
            max_position: 0,
            vocab: self.config.vocab_size,
        })
    }

    /// The next steps' inputs: sequence b (slot b of the cache) decodes `tokens[b]` at
    /// `positions[b]`, keys `0..positions[b]` of its cache being its context.
    pub fn set_decode_inputs(
        &self,
        batch: &mut CudaDecodeBatch,
        tokens: &[u32],
        positions: &[usize],
    ) -> Result<(), CudaModelError> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(ForwardError::Empty.into());
        }
        if tokens.len() != positions.len() || tokens.len() > batch.max_sequences() {
            return Err(CudaModelError::Unsupported(format!(
                "{} tokens at {} positions for a batch of up to {} sequences",
                tokens.len(),
                positions.len(),
                batch.max_sequences()
            )));
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(ForwardError::TokenOutOfRange { id, vocab: c.vocab_size }.into());
        }
        let max_position = positions.iter().copied().max().unwrap_or(0);
        if max_position >= c.max_position_embeddings || u32::try_from(max_position).is_err() {
            return Err(
                ForwardError::ContextExceeded { needed: max_position + 1, max: c.max_position_embeddings }.into()
            );
        }
        // Every position fits in u32, as the largest does.
        let positions: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let stream = self.device.stream();
        stream.memcpy_htod(tokens, &mut batch.scratch.tokens).map_err(CudaError::from)?;
        stream.memcpy_htod(&positions, &mut batch.positions).map_err(CudaError::from)?;
        batch.sequences = tokens.len();
        batch.max_position = max_position;
        Ok(())
    }

    /// One decode step: every sequence of `batch` runs its token at its position, writes its key
    /// and value there in its slot of `cache` (what was there is replaced) and attends to that
    /// slot's positions up to its own; the logits are then in `batch`.
    pub fn decode_step(&self, cache: &mut CudaBatchCache, batch: &mut CudaDecodeBatch) -> Result<(), CudaModelError> {
        let c = &self.config;
        let dev = self.device.as_ref();
        let sequences = batch.sequences;
        if sequences == 0 {
            return Err(ForwardError::Empty.into());
        }
        if cache.keys.len() != c.num_layers || cache.kv_width != c.num_kv_heads * c.head_dim {
            return Err(CudaError::Shape("the KV cache was made for another model".into()).into());
        }
        if sequences > cache.batch {
            return Err(CudaModelError::Unsupported(format!(
                "{sequences} sequences in a cache of {} sequences",
                cache.batch
            )));
        }
        if batch.max_position >= cache.capacity {
            return Err(ForwardError::ContextExceeded { needed: batch.max_position + 1, max: cache.capacity }.into());
        }
        let shape = DecodeShape {
            sequences,
            capacity: cache.capacity,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let CudaDecodeBatch { scratch: s, positions, .. } = batch;
        let h = c.hidden_size;
        ops::embed(dev, &self.embed, (c.vocab_size, h), &s.tokens, sequences, &mut s.x)?;
        self.run_blocks(s, sequences, |i, layer, io| {
            let (keys, values) = (&mut cache.keys[i], &mut cache.values[i]);
            let bias = layer.qkv_bias.as_ref();
            ops::rope_qkv_decode_batched(dev, io.qkv, bias, &self.rope, positions, shape, io.q, keys, values)?;
            ops::attention_decode_batched(dev, io.q, keys, values, positions, shape, io.scratch, io.out)?;
            Ok(())
        })?;
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.blas.f16_to_f32(&s.normed, lm_head, &mut s.logits, (sequences, c.vocab_size, h))?;
        Ok(())
    }
}

/// Activations of up to `rows` tokens. The f16 buffers that MixQ's kernels read or write hold the
/// values as their bits (`u16`, the type `anyq_cuda::mixq` takes); cuBLAS and the model's kernels
/// take either.
struct Scratch {
    rows: usize,
    tokens: CudaSlice<u32>,
    /// The residual stream `[rows, hidden]`.
    x: CudaSlice<f32>,
    /// RMSNorm outputs `[rows, hidden]`: the FP16 GEMMs' inputs.
    normed: CudaSlice<f16>,
    /// `[rows, q_width + 2 · kv_width]`.
    qkv: CudaSlice<u16>,
    /// Rotated queries `[rows, q_width]`.
    q: CudaSlice<f16>,
    /// Attention output `[rows, q_width]`.
    attn: CudaSlice<u16>,
    /// Split attention's partial results (decode of few sequences).
    attention_scratch: AttentionScratch,
    /// An FP16 sub-layer's output `[rows, hidden]`, added to `x`.
    delta: CudaSlice<f32>,
    /// A MixQ sub-layer's output `[rows, hidden]`, added to `x`.
    delta_half: CudaSlice<u16>,
    /// `[rows, 2 · ffn]`.
    gate_up: CudaSlice<u16>,
    /// silu(gate) · up `[rows, ffn]`, for FP16 down projections.
    act: CudaSlice<f16>,
    mixq: MixqInputs,
    /// Final hidden states of up to `logit_rows` tokens `[logit_rows, hidden]`, for the logits
    /// GEMM of a prefill.
    logit_input: CudaSlice<f16>,
    /// `[logit_rows, vocab]`.
    logits: CudaSlice<f32>,
}

/// MixQ's quantized inputs: a buffer per distinct outlier set, which each MixQ layer with that set
/// fills just before its GEMM reads it. Models whose layers share sets (the benchmark's random
/// ones) have a few; calibrated checkpoints, whose sets differ from block to block, one per
/// layer input.
struct MixqInputs {
    buffers: Vec<MixqActivations>,
    /// Per block, the buffer of each of its linear layers (in `BLOCK_LINEARS`' order) that is MixQ.
    of_block: Vec<[Option<usize>; 4]>,
    /// Token rows quantized, once per MixQ layer input they passed through.
    rows: u64,
}

impl MixqInputs {
    fn new(device: &CudaDevice, layers: &[CudaLayer], rows: usize) -> Result<Self, CudaError> {
        // (k, set) of each buffer: sets of the same width and channels quantize alike.
        let mut sets: Vec<(usize, &Arc<OutlierSet>)> = Vec::new();
        let mut buffers = Vec::new();
        let mut of_block = Vec::with_capacity(layers.len());
        for layer in layers {
            let mut of = [None; 4];
            for (slot, (_, linear)) in of.iter_mut().zip(BLOCK_LINEARS) {
                let Some(set) = linear(layer).outliers() else { continue };
                let k = linear(layer).shape().1;
                let same = |&(k_b, b): &(usize, &Arc<OutlierSet>)| k_b == k && b.channels() == set.channels();
                *slot = Some(match sets.iter().position(same) {
                    Some(b) => b,
                    None => {
                        sets.push((k, set));
                        buffers.push(MixqActivations::new(device, rows, set)?);
                        buffers.len() - 1
                    }
                });
            }
            of_block.push(of);
        }
        Ok(Self { buffers, of_block, rows: 0 })
    }

    fn buffer(&mut self, index: Option<usize>) -> Option<&mut MixqActivations> {
        index.map(|b| &mut self.buffers[b])
    }

    fn counts(&self, device: &CudaDevice) -> Result<Option<MixqCounts>, CudaError> {
        if self.buffers.is_empty() {
            return Ok(None);
        }
        let mut over_threshold = 0;
        for buffer in &self.buffers {
            over_threshold += u64::from(buffer.over_threshold(device)?);
        }
        Ok(Some(MixqCounts { rows: self.rows, over_threshold }))
    }
}

/// How often MixQ's inputs held an activation above their layer's calibration threshold outside
/// its outlier channels: where a CPU MixQ layer adds the channel to its set, the GPU's sets stay
/// as converted and the channel is quantized with the rest (a coarser int8 scale for that token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixqCounts {
    /// Token rows quantized, once per MixQ layer input they passed through.
    pub rows: u64,
    /// Of those, the rows over the threshold.
    pub over_threshold: u64,
}

impl Scratch {
    fn new(model: &CudaLlama, rows: usize, logit_rows: usize) -> Result<Self, CudaError> {
        let (device, c) = (model.device.as_ref(), &model.config);
        let (h, ffn) = (c.hidden_size, c.intermediate_size);
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        Ok(Self {
            rows,
            tokens: device.zeros(rows)?,
            x: device.zeros(rows * h)?,
            normed: device.zeros(rows * h)?,
            qkv: device.zeros(rows * (q_width + 2 * kv_width))?,
            q: device.zeros(rows * q_width)?,
            attn: device.zeros(rows * q_width)?,
            attention_scratch: AttentionScratch::new(device)?,
            delta: device.zeros(rows * h)?,
            delta_half: device.zeros(rows * h)?,
            gate_up: device.zeros(rows * 2 * ffn)?,
            act: device.zeros(rows * ffn)?,
            mixq: MixqInputs::new(device, &model.layers, rows)?,
            logit_input: device.zeros(logit_rows * h)?,
            logits: device.zeros(logit_rows * c.vocab_size)?,
        })
    }
}

/// The GPU model with a cache of its own, for the generation loop.
pub struct CudaDecoder<'a> {
    model: &'a CudaLlama,
    cache: CudaKvCache,
}

impl CudaDecoder<'_> {
    /// [`CudaLlama::mixq_counts`] of the decoder's cache.
    pub fn mixq_counts(&self) -> Result<Option<MixqCounts>, CudaModelError> {
        self.model.mixq_counts(&self.cache)
    }
}

impl Decoder for CudaDecoder<'_> {
    type Error = CudaModelError;

    fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, CudaModelError> {
        self.model.forward_last(tokens, &mut self.cache)
    }

    fn forward_all(&mut self, tokens: &[u32], on_logits: &mut dyn FnMut(usize, &[f32])) -> Result<(), CudaModelError> {
        self.model.forward_all(tokens, &mut self.cache, on_logits)
    }

    fn clear(&mut self) {
        self.cache.truncate(0);
    }

    fn positions(&self) -> usize {
        self.cache.len
    }

    fn max_positions(&self) -> usize {
        self.cache.capacity
    }
}
