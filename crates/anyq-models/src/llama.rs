//! The LLaMA family (LLaMA 2/3, Mistral, Qwen2, SmolLM): pre-norm decoder blocks of grouped-query
//! attention with RoPE and a SwiGLU MLP. Differences between members are config values.

use std::sync::Arc;

use anyq_core::cpu::{
    add_inplace, causal_attention, rms_norm, rms_norm_scanned, scan_activations, silu_mul, silu_mul_scanned,
    AttentionShape, Rope, RopeStyle,
};
use anyq_core::{ActivationScan, DenseLinear, Linear, ScanRequest};
use anyq_quant::ggml::GgmlType;
use anyq_quant::ggml_linear::GgmlLinear;
use anyq_quant::methods::QuantMethod;

use crate::config::ModelConfig;
use crate::error::LoadError;
use crate::loader::{StoredTensor, WeightSource};

/// A block's linear layers by Hugging Face module name, in forward order; `Block::linears` is
/// indexed the same way.
pub const LINEAR_MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
const Q_PROJ: usize = 0;
const K_PROJ: usize = 1;
const V_PROJ: usize = 2;
const O_PROJ: usize = 3;
const GATE_PROJ: usize = 4;
const UP_PROJ: usize = 5;
const DOWN_PROJ: usize = 6;

struct Block {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    linears: [Box<dyn Linear>; 7],
}

fn module_index(module: &str) -> Option<usize> {
    LINEAR_MODULES.iter().position(|m| *m == module)
}

pub struct LlamaModel {
    pub config: ModelConfig,
    /// `[vocab, hidden]`; also the output projection when embeddings are tied.
    embed_tokens: Arc<dyn Linear>,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    lm_head: Arc<dyn Linear>,
    rope: Rope,
}

/// A weight outside the block linear layers: f32, or GGML blocks kept as loaded (a GGUF's Q8_0
/// embeddings), rows back to back.
pub enum FloatWeight {
    F32(Vec<f32>),
    Ggml { ggml_type: GgmlType, bytes: Vec<u8> },
}

/// Keys and values of every layer for one sequence, `[len, n_kv_heads · head_dim]` per layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions from `len` on (e.g. to re-run a prompt suffix).
    pub fn truncate(&mut self, len: usize, kv_width: usize) {
        self.len = self.len.min(len);
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            layer.truncate(self.len * kv_width);
        }
    }
}

/// The activations that a block's linear layers read: calibration observes them here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearInput {
    /// RMSNorm output, read by q_proj, k_proj and v_proj.
    Attention,
    /// Attention output, read by o_proj.
    AttentionOutput,
    /// RMSNorm output, read by gate_proj and up_proj.
    Mlp,
    /// silu(gate) · up, read by down_proj.
    MlpDown,
}

impl LinearInput {
    pub const ALL: [LinearInput; 4] = [Self::Attention, Self::AttentionOutput, Self::Mlp, Self::MlpDown];

    /// The linear layers (Hugging Face module names within a block) that read this input.
    pub fn consumers(self) -> &'static [&'static str] {
        match self {
            Self::Attention => &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            Self::AttentionOutput => &["self_attn.o_proj"],
            Self::Mlp => &["mlp.gate_proj", "mlp.up_proj"],
            Self::MlpDown => &["mlp.down_proj"],
        }
    }
}

/// Sees every linear layer's input during a forward pass (`x` is `[tokens, cols]`).
pub trait ActivationObserver {
    fn observe(&mut self, layer: usize, input: LinearInput, x: &[f32], cols: usize);
}

/// The layers that read one activation, with the scans of it that they ask for
/// (`Linear::input_scan`): the op that writes the activation computes the first in the same
/// pass, any other distinct request gets a pass of its own, and layers whose requests are equal
/// share one scan (q/k/v under MixQ, whose outlier sets come from the same statistics and grow
/// from the same scans).
struct InputScans<'a, const N: usize> {
    layers: [&'a dyn Linear; N],
    /// Per layer, its scan in `scans`, if it asked for one.
    scan_of: [Option<usize>; N],
    scans: Vec<ActivationScan>,
}

impl<'a, const N: usize> InputScans<'a, N> {
    /// Writes the activation `x` (`[m, cols]`) that `layers` read: with `plain`, or with
    /// `scanned`, the same op computing a scan as it writes, when a layer asks for one.
    fn produce(
        layers: [&'a dyn Linear; N],
        x: &mut [f32],
        m: usize,
        plain: impl FnOnce(&mut [f32]),
        scanned: impl FnOnce(&mut [f32], &ScanRequest) -> ActivationScan,
    ) -> Self {
        let mut requests: Vec<ScanRequest> = Vec::new();
        let scan_of = layers.map(|layer| {
            let request = layer.input_scan()?;
            Some(requests.iter().position(|r| *r == request).unwrap_or_else(|| {
                requests.push(request);
                requests.len() - 1
            }))
        });
        let mut scans = Vec::with_capacity(requests.len());
        match requests.split_first() {
            None => plain(x),
            Some((first, rest)) => {
                scans.push(scanned(x, first));
                scans.extend(rest.iter().map(|r| scan_activations(x, m, r)));
            }
        }
        Self { layers, scan_of, scans }
    }

    /// `layers[i]` on the activation.
    fn forward(&self, i: usize, x: &[f32], m: usize, out: &mut [f32]) {
        match self.scan_of[i] {
            Some(s) => self.layers[i].forward_scanned(x, m, &self.scans[s], out),
            None => self.layers[i].forward(x, m, out),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{needed} positions exceed the model's context of {max}")]
    ContextExceeded { needed: usize, max: usize },
    #[error("no tokens to run")]
    Empty,
}

impl LlamaModel {
    /// Builds the model from named weights (Hugging Face names), checking every shape. With
    /// `quantized`, the block linear layers are that method's stored arrays.
    pub fn load(
        config: ModelConfig,
        weights: &dyn WeightSource,
        quantized: Option<&dyn QuantMethod>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Self, LoadError> {
        let c = &config;
        let (h, kv_width, q_width) = (c.hidden_size, c.num_kv_heads * c.head_dim, c.num_heads * c.head_dim);
        let loader = Loader { weights, quantized };
        let embed_tokens: Arc<dyn Linear> = loader.linear("model.embed_tokens.weight", None, c.vocab_size, h)?.into();
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            progress(i, c.num_layers);
            let p = format!("model.layers.{i}");
            let linear = |name: &str, bias: bool, out: usize, inp: usize| {
                loader.block_linear(&format!("{p}.{name}"), bias && c.qkv_bias, out, inp)
            };
            blocks.push(Block {
                attn_norm: loader.vector(&format!("{p}.input_layernorm.weight"), h)?,
                mlp_norm: loader.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                // In LINEAR_MODULES order.
                linears: [
                    linear("self_attn.q_proj", true, q_width, h)?,
                    linear("self_attn.k_proj", true, kv_width, h)?,
                    linear("self_attn.v_proj", true, kv_width, h)?,
                    linear("self_attn.o_proj", false, h, q_width)?,
                    linear("mlp.gate_proj", false, c.intermediate_size, h)?,
                    linear("mlp.up_proj", false, c.intermediate_size, h)?,
                    linear("mlp.down_proj", false, h, c.intermediate_size)?,
                ],
            });
        }
        progress(c.num_layers, c.num_layers);
        let norm = loader.vector("model.norm.weight", h)?;
        let lm_head: Arc<dyn Linear> = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            loader.linear("lm_head.weight", None, c.vocab_size, h)?.into()
        };
        let rope = Rope::new(c.rope_style, c.head_dim, c.rope_theta, c.rope_freq_factors.as_deref());
        Ok(Self { config, embed_tokens, blocks, norm, lm_head, rope })
    }

    /// A block's linear layer by module name (one of `LINEAR_MODULES`).
    pub fn linear(&self, layer: usize, module: &str) -> Option<&dyn Linear> {
        Some(self.blocks.get(layer)?.linears[module_index(module)?].as_ref())
    }

    /// The token embeddings `[vocab, hidden]`.
    pub fn embed_tokens(&self) -> &dyn Linear {
        self.embed_tokens.as_ref()
    }

    /// The output projection `[vocab, hidden]` (the embeddings when they are tied).
    pub fn lm_head(&self) -> &dyn Linear {
        self.lm_head.as_ref()
    }

    /// A block's RMSNorm weights: before attention and before the MLP.
    pub fn block_norms(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        let block = self.blocks.get(layer)?;
        Some((&block.attn_norm, &block.mlp_norm))
    }

    /// The final RMSNorm's weight.
    pub fn final_norm(&self) -> &[f32] {
        &self.norm
    }

    /// Replaces a block's linear layer (quantization works layer by layer) and returns the old
    /// one. The new layer must have the same shape.
    pub fn replace_linear(
        &mut self,
        layer: usize,
        module: &str,
        linear: Box<dyn Linear>,
    ) -> Result<Box<dyn Linear>, String> {
        let slot = module_index(module)
            .and_then(|i| Some(&mut self.blocks.get_mut(layer)?.linears[i]))
            .ok_or_else(|| format!("no linear layer {module} in layer {layer}"))?;
        let (old, new) = ((slot.out_features(), slot.in_features()), (linear.out_features(), linear.in_features()));
        if old != new {
            return Err(format!(
                "layer {layer} {module}: shape [{}, {}] cannot replace [{}, {}]",
                new.0, new.1, old.0, old.1
            ));
        }
        Ok(std::mem::replace(slot, linear))
    }

    /// Puts Q/K rows in Hugging Face's order (NeoX "rotate half" RoPE) where they are in
    /// llama.cpp's interleaved order, so that the model can be written as a Hugging Face folder.
    /// Both orders compute the same function; the Q/K layers become f32.
    pub fn use_neox_rope(&mut self) {
        if self.config.rope_style == RopeStyle::Neox {
            return;
        }
        let head_dim = self.config.head_dim;
        for block in &mut self.blocks {
            for i in [Q_PROJ, K_PROJ] {
                let old = &block.linears[i];
                let (n, k) = (old.out_features(), old.in_features());
                let weight = interleaved_to_neox_rows(&old.dense_weight(), k, head_dim);
                let bias = old.bias().map(|b| interleaved_to_neox_rows(b, 1, head_dim));
                block.linears[i] = Box::new(DenseLinear::new(weight, bias, n, k));
            }
        }
        let c = &mut self.config;
        c.rope_style = RopeStyle::Neox;
        self.rope = Rope::new(c.rope_style, c.head_dim, c.rope_theta, c.rope_freq_factors.as_deref());
    }

    /// The weights outside the block linear layers, by Hugging Face name, with their shapes:
    /// embeddings, norms and (when not tied) the output projection.
    pub fn float_tensors(&self) -> Vec<(String, Vec<usize>, FloatWeight)> {
        let (c, h) = (&self.config, self.config.hidden_size);
        let matrix = |linear: &dyn Linear| match linear.as_any().downcast_ref::<GgmlLinear>() {
            Some(g) => FloatWeight::Ggml { ggml_type: g.ggml_type(), bytes: g.bytes().to_vec() },
            None => FloatWeight::F32(linear.dense_weight()),
        };
        let mut tensors =
            vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h], matrix(self.embed_tokens.as_ref()))];
        for (i, b) in self.blocks.iter().enumerate() {
            let norms = [("input_layernorm", &b.attn_norm), ("post_attention_layernorm", &b.mlp_norm)];
            for (name, norm) in norms {
                tensors.push((format!("model.layers.{i}.{name}.weight"), vec![h], FloatWeight::F32(norm.clone())));
            }
        }
        tensors.push(("model.norm.weight".into(), vec![h], FloatWeight::F32(self.norm.clone())));
        if !c.tie_word_embeddings {
            tensors.push(("lm_head.weight".into(), vec![c.vocab_size, h], matrix(self.lm_head.as_ref())));
        }
        tensors
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            keys: vec![Vec::new(); self.config.num_layers],
            values: vec![Vec::new(); self.config.num_layers],
            len: 0,
        }
    }

    /// Bytes of all weights (what one decode step reads).
    pub fn weight_bytes(&self) -> usize {
        let block_bytes: usize = self
            .blocks
            .iter()
            .map(|b| {
                b.linears.iter().map(|l| l.weight_bytes()).sum::<usize>() + 4 * (b.attn_norm.len() + b.mlp_norm.len())
            })
            .sum();
        let head = if self.config.tie_word_embeddings { 0 } else { self.lm_head.weight_bytes() };
        self.embed_tokens.weight_bytes() + block_bytes + head + 4 * self.norm.len()
    }

    /// Runs `tokens` at the positions after those in `cache`, appends their keys and values to
    /// it, and returns the final-norm hidden states `[tokens.len(), hidden]`.
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, ForwardError> {
        self.forward_observed(tokens, cache, None)
    }

    /// `forward_hidden`, showing each linear layer's input to `observer`.
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        mut observer: Option<&mut dyn ActivationObserver>,
    ) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let (t, h) = (tokens.len(), c.hidden_size);
        if t == 0 {
            return Err(ForwardError::Empty);
        }
        let past = cache.len;
        if past + t > c.max_position_embeddings {
            return Err(ForwardError::ContextExceeded { needed: past + t, max: c.max_position_embeddings });
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(ForwardError::TokenOutOfRange { id, vocab: c.vocab_size });
        }
        let mut x = vec![0.0; t * h];
        for (&id, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            self.embed_tokens.weight_row(id as usize, row);
        }

        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let (cos, sin) = self.rope.tables(past..past + t);
        let shape =
            AttentionShape { queries: t, past, n_heads: c.num_heads, n_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        let mut normed = vec![0.0; t * h];
        let mut q = vec![0.0; t * q_width];
        let mut k = vec![0.0; t * kv_width];
        let mut v = vec![0.0; t * kv_width];
        let mut attn = vec![0.0; t * q_width];
        let mut gate = vec![0.0; t * c.intermediate_size];
        let mut up = vec![0.0; t * c.intermediate_size];
        let mut out = vec![0.0; t * h];

        let mut observe = |layer: usize, input: LinearInput, x: &[f32], cols: usize| {
            if let Some(o) = observer.as_deref_mut() {
                o.observe(layer, input, x, cols);
            }
        };
        let eps = c.rms_norm_eps;
        for (layer, b) in self.blocks.iter().enumerate() {
            normed.copy_from_slice(&x);
            let qkv = InputScans::produce(
                [Q_PROJ, K_PROJ, V_PROJ].map(|i| b.linears[i].as_ref()),
                &mut normed,
                t,
                |x| rms_norm(x, &b.attn_norm, eps),
                |x, request| rms_norm_scanned(x, &b.attn_norm, eps, request),
            );
            observe(layer, LinearInput::Attention, &normed, h);
            qkv.forward(0, &normed, t, &mut q);
            qkv.forward(1, &normed, t, &mut k);
            qkv.forward(2, &normed, t, &mut v);
            self.rope.apply(&mut q, c.num_heads, &cos, &sin);
            self.rope.apply(&mut k, c.num_kv_heads, &cos, &sin);
            cache.keys[layer].extend_from_slice(&k);
            cache.values[layer].extend_from_slice(&v);
            causal_attention(&q, &cache.keys[layer], &cache.values[layer], &mut attn, shape);
            observe(layer, LinearInput::AttentionOutput, &attn, q_width);
            b.linears[O_PROJ].forward(&attn, t, &mut out);
            add_inplace(&mut x, &out);

            normed.copy_from_slice(&x);
            let gate_up = InputScans::produce(
                [GATE_PROJ, UP_PROJ].map(|i| b.linears[i].as_ref()),
                &mut normed,
                t,
                |x| rms_norm(x, &b.mlp_norm, eps),
                |x, request| rms_norm_scanned(x, &b.mlp_norm, eps, request),
            );
            observe(layer, LinearInput::Mlp, &normed, h);
            gate_up.forward(0, &normed, t, &mut gate);
            gate_up.forward(1, &normed, t, &mut up);
            let down = InputScans::produce(
                [b.linears[DOWN_PROJ].as_ref()],
                &mut gate,
                t,
                |g| silu_mul(g, &up),
                |g, request| silu_mul_scanned(g, &up, request),
            );
            observe(layer, LinearInput::MlpDown, &gate, c.intermediate_size);
            down.forward(0, &gate, t, &mut out);
            add_inplace(&mut x, &out);
        }
        cache.len += t;
        rms_norm(&mut x, &self.norm, c.rms_norm_eps);
        Ok(x)
    }

    /// Logits `[rows, vocab]` of final hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let rows = hidden.len() / self.config.hidden_size;
        let mut logits = vec![0.0; rows * self.config.vocab_size];
        self.lm_head.forward(hidden, rows, &mut logits);
        logits
    }

    /// Runs `tokens` and returns the logits of the last one.
    pub fn forward_last(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, ForwardError> {
        let hidden = self.forward_hidden(tokens, cache)?;
        Ok(self.logits(&hidden[hidden.len() - self.config.hidden_size..]))
    }
}

/// llama.cpp's Q/K row order back to Hugging Face's: interleaved row `2i + s` of a head is row
/// `s · d/2 + i` in "rotate half" order. `w` is `[rows, cols]` with rows a multiple of `head_dim`.
fn interleaved_to_neox_rows(w: &[f32], cols: usize, head_dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for (head_in, head_out) in w.chunks_exact(head_dim * cols).zip(out.chunks_exact_mut(head_dim * cols)) {
        for (row, src) in head_in.chunks_exact(cols).enumerate() {
            let (i, s) = (row / 2, row % 2);
            let to = s * head_dim / 2 + i;
            head_out[to * cols..(to + 1) * cols].copy_from_slice(src);
        }
    }
    out
}

/// Fetches weights by name and checks their shapes, naming the tensor when one is wrong.
struct Loader<'a> {
    weights: &'a dyn WeightSource,
    quantized: Option<&'a dyn QuantMethod>,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let err =
            |message: String| LoadError::Tensor { path: self.weights.source_path(), tensor: name.to_string(), message };
        let tensor = self.weights.tensor(name)?.ok_or_else(|| err("missing".into()))?;
        // A 1-D weight may be stored as [1, n] by some converters; compare element layouts.
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if squeeze(tensor.shape()) != squeeze(shape) {
            return Err(err(format!("expected shape {shape:?}, got {:?}", tensor.shape())));
        }
        Ok(tensor.into_data())
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>, LoadError> {
        self.get(name, &[n])
    }

    /// The block linear layer `module` (`model.layers.3.self_attn.q_proj`), `[out, inp]`.
    fn block_linear(&self, module: &str, bias: bool, out: usize, inp: usize) -> Result<Box<dyn Linear>, LoadError> {
        if let Some(method) = self.quantized {
            // The method's arrays include the bias.
            let arrays = self.weights.arrays(module)?;
            return method.load(arrays, out, inp).map_err(|e| LoadError::Tensor {
                path: self.weights.source_path(),
                tensor: module.to_string(),
                message: e.to_string(),
            });
        }
        let bias = if bias { Some(self.vector(&format!("{module}.bias"), out)?) } else { None };
        self.linear(&format!("{module}.weight"), bias, out, inp)
    }

    /// A linear layer `[out, inp]`: GGML blocks that have a kernel stay as stored (4-8x less
    /// memory to read per token than f32, same products up to summation order); anything else
    /// is dequantized to f32.
    fn linear(&self, name: &str, bias: Option<Vec<f32>>, out: usize, inp: usize) -> Result<Box<dyn Linear>, LoadError> {
        if let Some(StoredTensor { ggml_type, shape, bytes }) = self.weights.stored(name) {
            if shape == [out, inp] && GgmlLinear::supports(ggml_type) && inp.is_multiple_of(ggml_type.block_size()) {
                let linear =
                    GgmlLinear::new(ggml_type, bytes.to_vec(), bias, out, inp).map_err(|e| LoadError::Tensor {
                        path: self.weights.source_path(),
                        tensor: name.to_string(),
                        message: e.to_string(),
                    })?;
                return Ok(Box::new(linear));
            }
        }
        Ok(Box::new(DenseLinear::new(self.get(name, &[out, inp])?, bias, out, inp)))
    }
}
