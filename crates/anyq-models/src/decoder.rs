//! One sequence being decoded, whatever the device: a model with its KV cache. Generation drives
//! this trait, so the same loop runs the CPU model and the GPU one.

use crate::llama::{ForwardError, KvCache, LlamaModel};

pub trait Decoder {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs `tokens` at the positions after those held, keeps their keys and values, and returns
    /// the logits `[vocab]` of the last one.
    fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Self::Error>;

    /// Runs `tokens` as `forward_last` does and hands the logits `[vocab]` of each of them to
    /// `on_logits`, with its index in `tokens`, in order (perplexity reads them all).
    fn forward_all(&mut self, tokens: &[u32], on_logits: &mut dyn FnMut(usize, &[f32])) -> Result<(), Self::Error>;

    /// Forgets every position held: the next call starts a new sequence.
    fn clear(&mut self);

    /// Positions held.
    fn positions(&self) -> usize;

    /// The most positions the sequence can hold.
    fn max_positions(&self) -> usize;
}

/// Rows of logits computed at a time by `forward_all`: `[rows, vocab]` stays a few MB even for
/// large vocabularies.
pub const LOGIT_ROWS: usize = 64;

/// The CPU model with a cache of its own.
pub struct CpuDecoder<'a> {
    model: &'a LlamaModel,
    cache: KvCache,
}

impl<'a> CpuDecoder<'a> {
    pub fn new(model: &'a LlamaModel) -> Self {
        Self { model, cache: model.new_cache() }
    }
}

impl Decoder for CpuDecoder<'_> {
    type Error = ForwardError;

    fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ForwardError> {
        self.model.forward_last(tokens, &mut self.cache)
    }

    fn forward_all(&mut self, tokens: &[u32], on_logits: &mut dyn FnMut(usize, &[f32])) -> Result<(), ForwardError> {
        let hidden = self.model.forward_hidden(tokens, &mut self.cache)?;
        let (h, vocab) = (self.model.config.hidden_size, self.model.config.vocab_size);
        for (block, rows) in hidden.chunks(LOGIT_ROWS * h).enumerate() {
            for (r, logits) in self.model.logits(rows).chunks_exact(vocab).enumerate() {
                on_logits(block * LOGIT_ROWS + r, logits);
            }
        }
        Ok(())
    }

    fn clear(&mut self) {
        self.cache = self.model.new_cache();
    }

    fn positions(&self) -> usize {
        self.cache.len()
    }

    fn max_positions(&self) -> usize {
        self.model.config.max_position_embeddings
    }
}
