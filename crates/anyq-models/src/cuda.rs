//! The LLaMA architecture on an NVIDIA GPU in FP16: the CPU model's weights converted to f16 once,
//! every linear layer a cuBLAS GEMM, the rest `anyq_cuda::ops` kernels, and an f16 KV cache on the
//! device. It computes what [`LlamaModel`] computes, as a transformer in half precision does:
//! f16 weights and activations between kernels, f32 arithmetic inside them, and an f32 residual
//! stream (SmolLM2's MLP adds values above 20000 to it).
//!
//! Per layer: `normed` → QKV GEMM (q, k, v weights stacked) → RoPE, KV-cache append → attention
//! → o_proj GEMM (f32 out) → `x += ·`, RMSNorm → gate/up GEMM (stacked) → SiLU·up → down GEMM
//! (f32 out) → `x += ·`, the next RMSNorm.

use std::sync::Arc;

use anyq_core::cpu::{AttentionShape, Rope};
use anyq_core::{DenseLinear, Linear};
use anyq_cuda::ops::{self, RopeFrequencies};
use anyq_cuda::{BlasGemm, CudaDevice, CudaError, CudaSlice};
use anyq_quant::ggml_linear::GgmlLinear;
use half::f16;

use crate::config::ModelConfig;
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

/// One decoder block's weights on the device.
struct Layer {
    attn_norm: CudaSlice<f32>,
    mlp_norm: CudaSlice<f32>,
    /// `[q_width + 2 · kv_width, hidden]`: the q, k and v rows, one GEMM for the three.
    qkv: CudaSlice<f16>,
    qkv_bias: Option<CudaSlice<f32>>,
    /// `[hidden, q_width]`.
    o_proj: CudaSlice<f16>,
    /// `[2 · ffn, hidden]`: the gate rows, then the up rows.
    gate_up: CudaSlice<f16>,
    /// `[hidden, ffn]`.
    down: CudaSlice<f16>,
}

pub struct CudaLlama {
    device: Arc<CudaDevice>,
    blas: BlasGemm,
    config: ModelConfig,
    /// `[vocab, hidden]`.
    embed: CudaSlice<f16>,
    /// `[vocab, hidden]`; `None` when tied to `embed`.
    lm_head: Option<CudaSlice<f16>>,
    layers: Vec<Layer>,
    final_norm: CudaSlice<f32>,
    rope: RopeFrequencies,
}

/// f32 weights as f16 on the device; a value beyond f16's range is an error, not an infinity.
fn upload_f16(device: &CudaDevice, name: &str, values: &[f32]) -> Result<CudaSlice<f16>, CudaModelError> {
    let converted: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    if let Some(i) = converted.iter().zip(values).position(|(h, v)| h.is_infinite() && v.is_finite()) {
        return Err(CudaModelError::Unsupported(format!(
            "{name}: value {} at {i} is beyond f16's range (±65504)",
            values[i]
        )));
    }
    Ok(device.upload(&converted)?)
}

/// The dense f32 weight of a float layer (f32, or GGML blocks that anyq computes dequantized);
/// quantized methods' layers compute something else (integer activations, ...) and are refused.
fn float_weight(linear: &dyn Linear, name: &str) -> Result<Vec<f32>, CudaModelError> {
    let any = linear.as_any();
    if !(any.is::<DenseLinear>() || any.is::<GgmlLinear>()) {
        return Err(CudaModelError::Unsupported(format!(
            "{name} is quantized: only FP16 models run on the GPU so far (run it with --device cpu)"
        )));
    }
    Ok(linear.dense_weight())
}

impl CudaLlama {
    /// Uploads `model`'s weights as f16. Refuses quantized layers and shapes the GPU kernels do
    /// not take.
    pub fn new(device: &Arc<CudaDevice>, model: &LlamaModel) -> Result<Self, CudaModelError> {
        let c = model.config.clone();
        let (h, q_width, kv_width) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
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
        let blas = BlasGemm::new(device)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        // (out, in) of each module of LINEAR_MODULES.
        let ffn = c.intermediate_size;
        let shapes = [(q_width, h), (kv_width, h), (kv_width, h), (h, q_width), (ffn, h), (ffn, h), (h, ffn)];
        for i in 0..c.num_layers {
            let mut linears: Vec<&dyn Linear> = Vec::with_capacity(LINEAR_MODULES.len());
            let mut weights = Vec::with_capacity(LINEAR_MODULES.len());
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
                weights.push(float_weight(linear, &name)?);
                linears.push(linear);
            }
            let [q, k, v, o, gate, up, down]: [Vec<f32>; 7] =
                weights.try_into().expect("one weight per module of LINEAR_MODULES");
            let qkv_bias = match linears[..3].iter().all(|l| l.bias().is_none()) {
                true => None,
                false => {
                    let bias: Vec<f32> = linears[..3]
                        .iter()
                        .zip(&shapes)
                        .flat_map(|(l, &(n, _))| l.bias().map_or_else(|| vec![0.0; n], <[f32]>::to_vec))
                        .collect();
                    Some(device.upload(&bias)?)
                }
            };
            let (attn_norm, mlp_norm) = model.block_norms(i).expect("layer i < num_layers");
            layers.push(Layer {
                attn_norm: device.upload(attn_norm)?,
                mlp_norm: device.upload(mlp_norm)?,
                qkv: upload_f16(device, &format!("layer {i} q/k/v_proj"), &[q, k, v].concat())?,
                qkv_bias,
                o_proj: upload_f16(device, &format!("layer {i} o_proj"), &o)?,
                gate_up: upload_f16(device, &format!("layer {i} gate/up_proj"), &[gate, up].concat())?,
                down: upload_f16(device, &format!("layer {i} down_proj"), &down)?,
            });
        }
        let embed = upload_f16(device, "embed_tokens", &float_weight(model.embed_tokens(), "embed_tokens")?)?;
        let lm_head = match c.tie_word_embeddings {
            true => None,
            false => Some(upload_f16(device, "lm_head", &float_weight(model.lm_head(), "lm_head")?)?),
        };
        let rope = Rope::new(c.rope_style, c.head_dim, c.rope_theta, c.rope_freq_factors.as_deref());
        Ok(Self {
            device: device.clone(),
            blas,
            final_norm: device.upload(model.final_norm())?,
            rope: RopeFrequencies::new(device, &rope)?,
            config: c,
            embed,
            lm_head,
            layers,
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
            scratch: Scratch::new(&self.device, c, PREFILL_CHUNK.min(capacity))?,
        })
    }

    /// A decoder over a new cache of `capacity` positions.
    pub fn decoder(&self, capacity: usize) -> Result<CudaDecoder<'_>, CudaModelError> {
        Ok(CudaDecoder { model: self, cache: self.new_cache(capacity)? })
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
        let (t, h, ffn, eps) = (tokens.len(), c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let shape = AttentionShape {
            queries: t,
            past: cache.len,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let s = &mut cache.scratch;
        self.device.stream().memcpy_htod(tokens, &mut s.tokens).map_err(CudaError::from)?;
        ops::embed(dev, &self.embed, (c.vocab_size, h), &s.tokens, t, &mut s.x)?;
        let first_norm = self.layers.first().map_or(&self.final_norm, |l| &l.attn_norm);
        ops::rms_norm(dev, &s.x, first_norm, eps, (t, h), &mut s.normed)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (keys, values) = (&mut cache.keys[i], &mut cache.values[i]);
            self.blas.f16(&s.normed, &layer.qkv, &mut s.qkv, (t, q_width + 2 * kv_width, h))?;
            ops::rope_qkv(dev, &s.qkv, layer.qkv_bias.as_ref(), &self.rope, shape, &mut s.q, keys, values)?;
            ops::attention(dev, &s.q, keys, values, shape, &mut s.attn)?;
            self.blas.f16_to_f32(&s.attn, &layer.o_proj, &mut s.delta, (t, h, q_width))?;
            ops::add_rms_norm(dev, &mut s.x, &s.delta, &layer.mlp_norm, eps, (t, h), &mut s.normed)?;

            self.blas.f16(&s.normed, &layer.gate_up, &mut s.gate_up, (t, 2 * ffn, h))?;
            ops::silu_mul(dev, &s.gate_up, (t, ffn), &mut s.act)?;
            self.blas.f16_to_f32(&s.act, &layer.down, &mut s.delta, (t, h, ffn))?;
            let next_norm = self.layers.get(i + 1).map_or(&self.final_norm, |l| &l.attn_norm);
            ops::add_rms_norm(dev, &mut s.x, &s.delta, next_norm, eps, (t, h), &mut s.normed)?;
        }
        cache.len += t;
        Ok(())
    }
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

/// Activations of up to `rows` tokens.
struct Scratch {
    rows: usize,
    tokens: CudaSlice<u32>,
    /// The residual stream `[rows, hidden]`.
    x: CudaSlice<f32>,
    /// RMSNorm outputs `[rows, hidden]`: the GEMMs' inputs.
    normed: CudaSlice<f16>,
    /// `[rows, q_width + 2 · kv_width]`.
    qkv: CudaSlice<f16>,
    /// Rotated queries `[rows, q_width]`.
    q: CudaSlice<f16>,
    /// Attention output `[rows, q_width]`.
    attn: CudaSlice<f16>,
    /// A sub-layer's output `[rows, hidden]`, added to `x`.
    delta: CudaSlice<f32>,
    /// `[rows, 2 · ffn]`.
    gate_up: CudaSlice<f16>,
    /// silu(gate) · up `[rows, ffn]`.
    act: CudaSlice<f16>,
    /// Final hidden states of up to `LOGIT_ROWS` tokens `[LOGIT_ROWS, hidden]`, for the logits GEMM.
    logit_input: CudaSlice<f16>,
    /// `[LOGIT_ROWS, vocab]`.
    logits: CudaSlice<f32>,
}

impl Scratch {
    fn new(device: &CudaDevice, c: &ModelConfig, rows: usize) -> Result<Self, CudaError> {
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
            delta: device.zeros(rows * h)?,
            gate_up: device.zeros(rows * 2 * ffn)?,
            act: device.zeros(rows * ffn)?,
            logit_input: device.zeros(LOGIT_ROWS * h)?,
            logits: device.zeros(LOGIT_ROWS * c.vocab_size)?,
        })
    }
}

/// The GPU model with a cache of its own, for the generation loop.
pub struct CudaDecoder<'a> {
    model: &'a CudaLlama,
    cache: CudaKvCache,
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
