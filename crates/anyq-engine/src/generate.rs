//! The generation loop: prefill the prompt in one batched pass, then decode token by token
//! against the KV cache, streaming each token as it is chosen.

use std::time::Instant;

use anyq_models::{CpuDecoder, Decoder, ForwardError, LlamaModel};
use tokenizers::Tokenizer;

use crate::sampling::Sampler;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token (EOS, end of turn) was generated.
    Stop,
    MaxTokens,
    /// The model's context is full.
    ContextFull,
    /// The caller asked to stop.
    Cancelled,
}

#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    /// Decode steps (each after the first generated token) and their time.
    pub decode_steps: usize,
    pub decode_secs: f64,
}

impl GenerationStats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(f64::MIN_POSITIVE)
    }

    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.decode_steps as f64 / self.decode_secs.max(f64::MIN_POSITIVE)
    }
}

pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub stats: GenerationStats,
}

/// Generates up to `max_new_tokens` after `prompt` on the CPU. `on_token` sees each new id and
/// returns false to stop. A stop id ends generation and is not included in the result.
pub fn generate(
    model: &LlamaModel,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation, ForwardError> {
    generate_with(&mut CpuDecoder::new(model), prompt, max_new_tokens, sampler, stop_ids, on_token)
}

/// [`generate`] on any device: `decoder` holds the model and a cache of the sequence, which
/// starts empty.
pub fn generate_with<D: Decoder>(
    decoder: &mut D,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation, D::Error> {
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    let mut history = prompt.to_vec();
    let mut tokens = Vec::new();
    let max_ctx = decoder.max_positions();

    let start = Instant::now();
    let mut logits = decoder.forward_last(prompt)?;
    stats.prefill_secs = start.elapsed().as_secs_f64();

    let decode_start = Instant::now();
    let stop = loop {
        if tokens.len() == max_new_tokens {
            break StopReason::MaxTokens;
        }
        let next = sampler.sample(&mut logits, &history);
        if stop_ids.contains(&next) {
            break StopReason::Stop;
        }
        tokens.push(next);
        history.push(next);
        if !on_token(next) {
            break StopReason::Cancelled;
        }
        if tokens.len() == max_new_tokens {
            break StopReason::MaxTokens;
        }
        if decoder.positions() + 1 > max_ctx {
            break StopReason::ContextFull;
        }
        logits = decoder.forward_last(&[next])?;
        stats.decode_steps += 1;
    };
    stats.decode_secs = decode_start.elapsed().as_secs_f64();
    stats.generated_tokens = tokens.len();
    Ok(Generation { tokens, stop, stats })
}

/// Turns a stream of token ids into text pieces, holding back bytes until they form whole
/// UTF-8 characters (byte-level BPE splits characters across tokens).
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// ids before `prefix` are settled; text of `prefix..read` has been emitted.
    prefix: usize,
    read: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self { tokenizer, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// The text that `id` completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, tokenizers::Error> {
        self.ids.push(id);
        // Decoding a few settled tokens before the new ones keeps spaces that a decoder would
        // strip at the start of a text.
        let emitted = self.tokenizer.decode(&self.ids[self.prefix..self.read], false)?;
        let all = self.tokenizer.decode(&self.ids[self.prefix..], false)?;
        if all.len() > emitted.len() && !all.ends_with('\u{FFFD}') && all.is_char_boundary(emitted.len()) {
            let piece = all[emitted.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }
}
