//! A `tokenizers::Tokenizer` built from the tokenizer a GGUF file carries in its metadata
//! (`tokenizer.ggml.*`), rebuilt the way Hugging Face's tokenizer.json defines each family:
//!
//! * `gpt2`: byte-level BPE from `tokens` + `merges`, pre-tokenizer chosen by `tokenizer.ggml.pre`;
//! * `llama`: SentencePiece-style BPE (LLaMA-2, Mistral) with merges derived from `scores`,
//!   byte fallback and `▁` for spaces.
//!
//! Control tokens (`token_type` 3) become special added tokens and user-defined ones (4) plain
//! added tokens, so e.g. `<|im_start|>` in text encodes to its single id.
//!
//! Hugging Face folders need no rebuilding: `tokenizer_from_hf_folder` reads their tokenizer.json.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::error::LoadError;
use crate::loader::gguf_meta::GgufMetadata;
use crate::loader::TokenizerBundle;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_attr` numbering).
const TYPE_UNKNOWN: u64 = 2;
const TYPE_CONTROL: u64 = 3;
const TYPE_USER_DEFINED: u64 = 4;

/// LLaMA-3's split regex (its tokenizer.json): digits in groups of 1-3.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (its tokenizer.json): digits one by one.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Control tokens that end a turn in common chat formats: generation stops at them too, as
/// llama.cpp does, since GGUFs often name only one of them as EOS.
const END_OF_TURN_TOKENS: &[&str] =
    &["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>"];

/// Special token ids of a GGUF tokenizer.
///
/// When `add_bos` (or `add_eos`) is set, the returned tokenizer's post-processor already adds
/// the token on `encode(text, true)`, as Hugging Face's does; `encode(text, false)` never adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End of turn (`tokenizer.ggml.eot_token_id`), where the file names one.
    pub eot: Option<u32>,
    /// End of message (`tokenizer.ggml.eom_token_id`), where the file names one.
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// Ids that end generation: eos, eot, eom and well-known end-of-turn control tokens. Sorted.
    pub stop: Vec<u32>,
}

impl SpecialTokens {
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop.binary_search(&id).is_ok()
    }
}

fn tok_err(message: impl Into<String>) -> LoadError {
    LoadError::Tokenizer(message.into())
}

/// Builds the tokenizer described by `tokenizer.ggml.*` metadata.
pub fn tokenizer_from_gguf(meta: &GgufMetadata) -> Result<(Tokenizer, SpecialTokens), LoadError> {
    let model = meta.str("tokenizer.ggml.model")?.ok_or_else(|| tok_err("missing key tokenizer.ggml.model"))?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?.ok_or_else(|| tok_err("missing key tokenizer.ggml.tokens"))?;
    if tokens.is_empty() {
        return Err(tok_err("tokenizer.ggml.tokens is empty"));
    }
    let n = tokens.len();
    let types = token_types(meta, n)?;

    // First occurrence wins: some GGUF vocabularies repeat a string (e.g. padding entries).
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(n);
    for (id, &t) in tokens.iter().enumerate() {
        vocab.entry(t).or_insert(id as u32);
    }

    let mut special = read_special_tokens(meta, n, model)?;
    let mut tokenizer = match model {
        "gpt2" => build_gpt2(meta, &vocab)?,
        "llama" => build_llama(meta, &tokens, &types, &vocab, &mut special)?,
        other => {
            return Err(tok_err(format!(
                "unsupported tokenizer model {other:?} (tokenizer.ggml.model; supported: gpt2, llama)"
            )))
        }
    };

    let added = |wanted: &dyn Fn(u64) -> bool, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|&(t, &ty)| wanted(ty) && !t.is_empty())
            .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
            .collect()
    };
    // Matched in raw text before normalization, as HF does; `<unk>` is special there too.
    tokenizer.add_special_tokens(&added(&|ty| ty == TYPE_CONTROL || ty == TYPE_UNKNOWN, true));
    tokenizer.add_tokens(&added(&|ty| ty == TYPE_USER_DEFINED, false));

    if let Some(pp) = bos_eos_processor(&tokens, &special)? {
        tokenizer.with_post_processor(Some(pp));
    }

    let mut stop: Vec<u32> = [special.eos, special.eot, special.eom].into_iter().flatten().collect();
    for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == TYPE_CONTROL && END_OF_TURN_TOKENS.contains(t) {
            stop.push(id as u32);
        }
    }
    stop.sort_unstable();
    stop.dedup();
    special.stop = stop;
    Ok((tokenizer, special))
}

/// `tokenizer.ggml.token_type`, one per token; absent means all normal.
fn token_types(meta: &GgufMetadata, n: usize) -> Result<Vec<u64>, LoadError> {
    let Some(items) = meta.array("tokenizer.ggml.token_type")? else { return Ok(vec![1; n]) };
    if items.len() != n {
        return Err(tok_err(format!("tokenizer.ggml.token_type has {} entries for {n} tokens", items.len())));
    }
    items
        .iter()
        .map(|v| v.as_u64().ok_or_else(|| tok_err(format!("tokenizer.ggml.token_type: bad entry {v:?}"))))
        .collect()
}

fn read_special_tokens(meta: &GgufMetadata, n: usize, model: &str) -> Result<SpecialTokens, LoadError> {
    // BOS/EOS matter for generation: a bad one is an error. The others are only hints.
    let strict = |key: &str| -> Result<Option<u32>, LoadError> {
        match meta.u64(key)? {
            Some(id) if id < n as u64 => Ok(Some(id as u32)),
            Some(id) => Err(tok_err(format!("{key} = {id} is outside the vocabulary of {n} tokens"))),
            None => Ok(None),
        }
    };
    let loose = |key: &str| meta.u64(key).ok().flatten().filter(|&id| id < n as u64).map(|id| id as u32);
    let bos = strict("tokenizer.ggml.bos_token_id")?;
    let eos = strict("tokenizer.ggml.eos_token_id")?;
    // SentencePiece models prepend BOS unless told otherwise; byte-level BPE ones do not.
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama") && bos.is_some();
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false) && eos.is_some();
    Ok(SpecialTokens {
        bos,
        eos,
        eot: loose("tokenizer.ggml.eot_token_id"),
        eom: loose("tokenizer.ggml.eom_token_id"),
        unk: loose("tokenizer.ggml.unknown_token_id"),
        pad: loose("tokenizer.ggml.padding_token_id"),
        add_bos,
        add_eos,
        stop: Vec::new(),
    })
}

fn bpe_err(e: impl std::fmt::Display) -> LoadError {
    tok_err(format!("building BPE model: {e}"))
}

fn to_vocab(vocab: &HashMap<&str, u32>) -> Vocab {
    vocab.iter().map(|(&t, &id)| (t.to_string(), id)).collect()
}

fn build_gpt2(meta: &GgufMetadata, vocab: &HashMap<&str, u32>) -> Result<Tokenizer, LoadError> {
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .ok_or_else(|| tok_err("missing key tokenizer.ggml.merges (required by the gpt2 tokenizer model)"))?;
    let merges = merges
        .iter()
        .map(|m| {
            // Split at the first space after the first character, as llama.cpp does.
            let at = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
            at.map(|i| (m[..i].to_string(), m[i + 1..].to_string()))
                .ok_or_else(|| tok_err(format!("tokenizer.ggml.merges: malformed entry {m:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let pre = meta.str("tokenizer.ggml.pre")?.unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    let split = |regex: &str| -> Result<PreTokenizerWrapper, LoadError> {
        let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| tok_err(format!("pre-tokenizer regex: {e}")))?;
        Ok(split.into())
    };
    let (normalizer, pre_tokenizer, ignore_merges): (Option<NormalizerWrapper>, PreTokenizerWrapper, bool) = match pre {
        "default" | "gpt2" => (None, byte_level.into(), false),
        "smollm" | "starcoder" | "refact" => {
            (None, PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(), false)
        }
        // LLaMA-3's tokenizer.json also looks whole words up in the vocabulary before merging.
        "llama-bpe" | "llama3" => (
            None,
            PreTokenizerSequence::new(vec![split(LLAMA3_REGEX)?, byte_level.use_regex(false).into()]).into(),
            true,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            Some(NFC.into()),
            PreTokenizerSequence::new(vec![
                split(QWEN2_REGEX)?,
                byte_level.use_regex(false).trim_offsets(false).into(),
            ])
            .into(),
            false,
        ),
        other => {
            return Err(tok_err(format!(
                "unsupported pre-tokenizer {other:?} (tokenizer.ggml.pre; supported: default, gpt2, smollm, \
                 starcoder, refact, llama-bpe, llama3, qwen2, deepseek-r1-qwen)"
            )))
        }
    };

    let bpe = BPE::builder()
        .vocab_and_merges(to_vocab(vocab), merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(bpe_err)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(normalizer);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

fn build_llama(
    meta: &GgufMetadata,
    tokens: &[&str],
    types: &[u64],
    vocab: &HashMap<&str, u32>,
    special: &mut SpecialTokens,
) -> Result<Tokenizer, LoadError> {
    let scores = match meta.array("tokenizer.ggml.scores")? {
        Some(items) if items.len() == tokens.len() => items
            .iter()
            .map(|v| v.as_f64().ok_or_else(|| tok_err(format!("tokenizer.ggml.scores: bad entry {v:?}"))))
            .collect::<Result<Vec<_>, _>>()?,
        Some(items) => {
            return Err(tok_err(format!(
                "tokenizer.ggml.scores has {} entries for {} tokens",
                items.len(),
                tokens.len()
            )))
        }
        // Without scores HF ranks merges by token id (lower id first).
        None => (0..tokens.len()).map(|id| -(id as f64)).collect(),
    };
    let merges = merges_from_scores(tokens, &scores, vocab);

    // The unknown token: by id, else by type, else the usual `<unk>`.
    let unk = special
        .unk
        .or_else(|| types.iter().position(|&t| t == TYPE_UNKNOWN).map(|i| i as u32))
        .or_else(|| vocab.get("<unk>").copied());
    special.unk = unk;
    let mut builder = BPE::builder().vocab_and_merges(to_vocab(vocab), merges).fuse_unk(true).byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(tokens[unk as usize].to_string());
    }
    let bpe = builder.build().map_err(bpe_err)?;

    // As HF's (legacy) LLaMA tokenizer.json: spaces become `▁` and one is prepended to the text.
    let add_space_prefix = meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| tok_err(format!("normalizer: {e}")));
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".to_string()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    let mut decoders: Vec<DecoderWrapper> =
        vec![replace("▁", " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// BPE merges for a SentencePiece vocabulary, as HF's `convert_slow_tokenizer.generate_merges`
/// derives them: every split of a piece into two vocabulary pieces is a merge, ranked by the
/// piece's score (higher first), then by the lengths of the left and right parts (longer first);
/// ties keep vocabulary order, splits of one piece ordered by the ids of their parts.
fn merges_from_scores(tokens: &[&str], scores: &[f64], vocab: &HashMap<&str, u32>) -> Vec<(String, String)> {
    struct Merge<'a> {
        score: f64,
        left: &'a str,
        right: &'a str,
        lens: (usize, usize),
    }
    let mut merges = Vec::new();
    for (id, &piece) in tokens.iter().enumerate() {
        if vocab.get(piece) != Some(&(id as u32)) {
            continue; // a repeated string: its first occurrence already counted
        }
        let mut local: Vec<(u32, u32, Merge)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (left, right) = piece.split_at(at);
                let (&l, &r) = (vocab.get(left)?, vocab.get(right)?);
                let lens = (left.chars().count(), right.chars().count());
                Some((l, r, Merge { score: scores[id], left, right, lens }))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local.into_iter().map(|(_, _, m)| m));
    }
    // Stable sort, descending: equal keys keep their order, as Python's sorted(reverse=True).
    merges.sort_by(|a, b| b.score.total_cmp(&a.score).then(b.lens.cmp(&a.lens)));
    merges.into_iter().map(|m| (m.left.to_string(), m.right.to_string())).collect()
}

/// A post-processor adding BOS/EOS on `encode(.., true)`, if the metadata asks for them.
fn bos_eos_processor(tokens: &[&str], special: &SpecialTokens) -> Result<Option<TemplateProcessing>, LoadError> {
    let bos = special.bos.filter(|_| special.add_bos);
    let eos = special.eos.filter(|_| special.add_eos);
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    // Template pieces name the special tokens by key ("bos"/"eos"), so their text may be anything.
    let template = |seq: &str, type_id: u32| -> Vec<String> {
        let mut pieces = Vec::new();
        if bos.is_some() {
            pieces.push(format!("bos:{type_id}"));
        }
        pieces.push(format!("{seq}:{type_id}"));
        if eos.is_some() {
            pieces.push(format!("eos:{type_id}"));
        }
        pieces
    };
    let mut pair = template("$A", 0);
    pair.extend(template("$B", 1));
    let named =
        |key: &str, id: u32| SpecialToken::new(key.to_string(), vec![id], vec![tokens[id as usize].to_string()]);
    let mut special_tokens = Vec::new();
    for (key, id) in [("bos", bos), ("eos", eos)] {
        if let Some(id) = id {
            special_tokens.push(named(key, id).map_err(|e| tok_err(format!("post-processor: {e}")))?);
        }
    }
    TemplateProcessing::builder()
        .try_single(template("$A", 0))
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| tok_err(format!("post-processor: {e}")))?
        .special_tokens(special_tokens)
        .build()
        .map(Some)
        .map_err(|e| tok_err(format!("post-processor: {e}")))
}

/// The tokenizer of a Hugging Face model folder: `tokenizer.json`, with special tokens and the
/// chat template from `tokenizer_config.json` (or `chat_template.jinja`) and extra stop ids from
/// `generation_config.json`. `None` when the folder has no `tokenizer.json`.
pub fn tokenizer_from_hf_folder(dir: &Path) -> Result<Option<TokenizerBundle>, LoadError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    let tokenizer = Tokenizer::from_file(&path).map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(serde_json::Value::Null);

    // Special tokens are given as text ("<s>") or as an added-token object ({"content": "<s>"}).
    let token_id = |key: &str| -> Option<u32> {
        let v = config.get(key)?;
        let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
        tokenizer.token_to_id(text)
    };
    let bos = token_id("bos_token");
    let eos = token_id("eos_token");
    // What tokenizer.json's post-processor adds is what `encode(.., true)` does.
    let with_special = tokenizer.encode("", true).map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
    let ids = with_special.get_ids();
    let add_bos = bos.is_some() && ids.first().copied() == bos;
    let add_eos = eos.is_some() && ids.last().copied() == eos;

    let mut stop: Vec<u32> = eos.into_iter().collect();
    if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
        match gen.get("eos_token_id") {
            Some(serde_json::Value::Array(ids)) => stop.extend(ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32)),
            Some(v) => stop.extend(v.as_u64().map(|v| v as u32)),
            None => {}
        }
    }
    for name in END_OF_TURN_TOKENS {
        if let Some(id) = tokenizer.token_to_id(name) {
            stop.push(id);
        }
    }
    stop.sort_unstable();
    stop.dedup();

    let chat_template = match config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        // A list of named templates: take the default one.
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string),
        _ => {
            let jinja = dir.join("chat_template.jinja");
            match std::fs::read_to_string(&jinja) {
                Ok(s) => Some(s),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(error) => return Err(LoadError::Io { path: jinja, error }),
            }
        }
    };
    let special = SpecialTokens {
        bos,
        eos,
        eot: None,
        eom: None,
        unk: token_id("unk_token"),
        pad: token_id("pad_token"),
        add_bos,
        add_eos,
        stop,
    };
    Ok(Some(TokenizerBundle { tokenizer, special, chat_template }))
}

/// A JSON file, `None` if absent.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>, LoadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(LoadError::io(path)(error)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LoadError::Format { path: path.to_path_buf(), message: format!("invalid JSON: {e}") })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use super::*;
    use crate::loader::gguf::GgufFile;
    use crate::loader::gguf_meta::MetaValue;

    fn strings(items: &[&str]) -> MetaValue {
        MetaValue::Array(items.iter().map(|s| MetaValue::String(s.to_string())).collect())
    }

    fn meta(entries: Vec<(&str, MetaValue)>) -> GgufMetadata {
        GgufMetadata { values: entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>() }
    }

    fn tokens_of(tok: &Tokenizer, text: &str, add_special: bool) -> Vec<String> {
        tok.encode(text, add_special).unwrap().get_tokens().to_vec()
    }

    fn round_trip(tok: &Tokenizer, text: &str) {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip of {text:?} via {ids:?}");
    }

    // ---- a tiny SentencePiece-style ("llama") vocabulary ----

    /// `<unk> <s> </s>`, the 256 byte tokens, then `pieces` (text, score).
    fn llama_meta(pieces: &[(&str, f32)], extra: Vec<(&str, MetaValue)>) -> GgufMetadata {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0f32; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for &(p, s) in pieces {
            tokens.push(p.to_string());
            types.push(1);
            scores.push(s);
        }
        let mut entries = vec![
            ("tokenizer.ggml.model", MetaValue::String("llama".into())),
            ("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect())),
            ("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect())),
            ("tokenizer.ggml.scores", MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect())),
            ("tokenizer.ggml.bos_token_id", MetaValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", MetaValue::U32(2)),
        ];
        entries.extend(extra);
        meta(entries)
    }

    const PIECES: &[(&str, f32)] = &[
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("c", -4.0),
        ("ab", -5.0),
        ("bc", -6.0),
        ("h", -7.0),
        ("e", -8.0),
        ("l", -9.0),
        ("o", -10.0),
        ("he", -11.0),
        ("ll", -12.0),
        ("llo", -13.0),
        ("hello", -14.0),
        ("▁hello", -15.0),
    ];

    #[test]
    fn merges_follow_hf_generate_merges() {
        // Expected orders computed with transformers' convert_slow_tokenizer.generate_merges.
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let vocab: HashMap<&str, u32> = tokens.iter().enumerate().map(|(i, &t)| (t, i as u32)).collect();
        let pairs = |m: Vec<(String, String)>| m.into_iter().map(|(l, r)| format!("{l} {r}")).collect::<Vec<_>>();
        let expected = ["ab c", "a bc", "a b", "b c"];
        assert_eq!(pairs(merges_from_scores(&tokens, &[0.0, 0.0, 0.0, -1.0, -2.0, -0.5], &vocab)), expected);
        assert_eq!(pairs(merges_from_scores(&tokens, &[0.0, 0.0, 0.0, -1.0, -1.0, -1.0], &vocab)), expected);
        // A lower score for "ab" than "bc" puts "b c" before "a b".
        assert_eq!(
            pairs(merges_from_scores(&tokens, &[0.0, 0.0, 0.0, -3.0, -2.0, -0.5], &vocab)),
            ["ab c", "a bc", "b c", "a b"]
        );
    }

    #[test]
    fn llama_scores_decide_merges() {
        let (tok, _) = tokenizer_from_gguf(&llama_meta(PIECES, vec![])).unwrap();
        assert_eq!(tokens_of(&tok, "abc", false), ["▁", "ab", "c"]);
        let mut flipped = PIECES.to_vec();
        flipped[5].1 = -4.5; // "bc" now outranks "ab"
        let (tok, _) = tokenizer_from_gguf(&llama_meta(&flipped, vec![])).unwrap();
        assert_eq!(tokens_of(&tok, "abc", false), ["▁", "a", "bc"]);
    }

    #[test]
    fn llama_spaces_byte_fallback_and_bos() {
        let (tok, special) = tokenizer_from_gguf(&llama_meta(PIECES, vec![])).unwrap();
        assert_eq!(tokens_of(&tok, "hello hello", false), ["▁hello", "▁hello"]);
        // "é" is not in the vocabulary: its UTF-8 bytes, "\n" likewise.
        assert_eq!(tokens_of(&tok, "hé\n", false), ["▁", "h", "<0xC3>", "<0xA9>", "<0x0A>"]);
        for text in ["hello", "hello  abc é\nhello", " leading space", "日本 ab"] {
            round_trip(&tok, text);
        }
        // Control tokens are single ids, text after one gets its own prefix space (as HF's legacy
        // LLaMA tokenizer and llama.cpp do). SentencePiece models add BOS by default.
        let ids = tok.encode("<s>hello</s>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [1, tok.token_to_id("▁hello").unwrap(), 2]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello");
        assert_eq!((special.bos, special.eos, special.add_bos, special.unk), (Some(1), Some(2), true, Some(0)));
        let with_bos = tok.encode("hello", true).unwrap();
        assert_eq!(with_bos.get_tokens(), ["<s>", "▁hello"]);
        assert_eq!(tok.decode(with_bos.get_ids(), true).unwrap(), "hello");
        assert!(special.is_stop(2) && !special.is_stop(1));

        let (tok, special) =
            tokenizer_from_gguf(&llama_meta(PIECES, vec![("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))]))
                .unwrap();
        assert!(!special.add_bos);
        assert_eq!(tokens_of(&tok, "hello", true), ["▁hello"]);
    }

    #[test]
    fn llama_without_space_prefix() {
        let extra = vec![("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false))];
        let (tok, _) = tokenizer_from_gguf(&llama_meta(PIECES, extra)).unwrap();
        assert_eq!(tokens_of(&tok, "hello hello", false), ["hello", "▁hello"]);
        round_trip(&tok, "hello hello");
        round_trip(&tok, " hello");
    }

    // ---- a tiny byte-level ("gpt2") vocabulary ----

    fn gpt2_meta(pre: Option<&str>) -> GgufMetadata {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        tokens.extend(alphabet.iter().map(|c| c.to_string()));
        tokens.extend(["12", "123", "45", "12345"].map(String::from));
        let mut types = vec![MetaValue::I32(3), MetaValue::I32(3)];
        types.resize(tokens.len(), MetaValue::I32(1));
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut entries = vec![
            ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strings(&refs)),
            ("tokenizer.ggml.token_type", MetaValue::Array(types)),
            ("tokenizer.ggml.merges", strings(&["1 2", "12 3", "4 5", "123 45"])),
            ("tokenizer.ggml.eos_token_id", MetaValue::U32(0)),
        ];
        if let Some(pre) = pre {
            entries.push(("tokenizer.ggml.pre", MetaValue::String(pre.into())));
        }
        meta(entries)
    }

    #[test]
    fn gpt2_pre_tokenizers_split_digits_as_their_models_do() {
        let cases: &[(Option<&str>, &[&str])] = &[
            (None, &["12345"]),
            (Some("gpt2"), &["12345"]),
            (Some("llama-bpe"), &["123", "45"]),
            (Some("smollm"), &["1", "2", "3", "4", "5"]),
            (Some("qwen2"), &["1", "2", "3", "4", "5"]),
        ];
        for &(pre, expected) in cases {
            let (tok, special) = tokenizer_from_gguf(&gpt2_meta(pre)).unwrap();
            assert_eq!(tokens_of(&tok, "12345", true), expected, "pre-tokenizer {pre:?}");
            assert!(!special.add_bos);
            assert_eq!(tok.encode("<|im_start|>x", false).unwrap().get_ids()[0], 1);
            for text in ["Hello, wörld!\n\n  12345\ttabs 日本語 😀", "  ", ""] {
                round_trip(&tok, text);
            }
        }
    }

    // ---- errors ----

    fn tokenizer_error(meta: &GgufMetadata) -> String {
        match tokenizer_from_gguf(meta) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let msg = tokenizer_error(&meta(vec![("tokenizer.ggml.model", MetaValue::String("gpt2".into()))]));
        assert!(msg.contains("tokenizer.ggml.tokens"), "{msg}");

        let msg = tokenizer_error(&meta(vec![("tokenizer.ggml.tokens", strings(&["a"]))]));
        assert!(msg.contains("tokenizer.ggml.model"), "{msg}");

        let mut m = gpt2_meta(None);
        m.values.insert("tokenizer.ggml.model".into(), MetaValue::String("wordpiece".into()));
        let msg = tokenizer_error(&m);
        assert!(msg.contains("\"wordpiece\""), "{msg}");

        let mut m = gpt2_meta(None);
        m.values.remove("tokenizer.ggml.merges");
        let msg = tokenizer_error(&m);
        assert!(msg.contains("tokenizer.ggml.merges"), "{msg}");

        let msg = tokenizer_error(&gpt2_meta(Some("mystery-pre")));
        assert!(msg.contains("\"mystery-pre\""), "{msg}");

        let mut m = gpt2_meta(None);
        m.values.insert("tokenizer.ggml.merges".into(), strings(&["1 2", "x yz"]));
        let msg = tokenizer_error(&m);
        assert!(msg.contains("yz"), "{msg}");

        let mut m = gpt2_meta(None);
        m.values.insert("tokenizer.ggml.merges".into(), strings(&["12"]));
        let msg = tokenizer_error(&m);
        assert!(msg.contains("malformed"), "{msg}");

        let mut m = gpt2_meta(None);
        m.values.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1_000_000));
        let msg = tokenizer_error(&m);
        assert!(msg.contains("tokenizer.ggml.bos_token_id"), "{msg}");

        let mut m = gpt2_meta(None);
        m.values.insert("tokenizer.ggml.token_type".into(), MetaValue::Array(vec![MetaValue::I32(1)]));
        let msg = tokenizer_error(&m);
        assert!(msg.contains("token_type"), "{msg}");

        let mut m = gpt2_meta(None);
        m.values.insert("tokenizer.ggml.tokens".into(), MetaValue::U32(3));
        let msg = tokenizer_error(&m);
        assert!(msg.contains("tokenizer.ggml.tokens"), "{msg}");

        let msg = tokenizer_error(&llama_meta(PIECES, vec![("tokenizer.ggml.scores", MetaValue::Array(vec![]))]));
        assert!(msg.contains("tokenizer.ggml.scores"), "{msg}");
    }

    // ---- the real SmolLM2 model ----

    fn repo_root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn smollm2() -> &'static (Tokenizer, SpecialTokens) {
        static TOKENIZER: OnceLock<(Tokenizer, SpecialTokens)> = OnceLock::new();
        TOKENIZER.get_or_init(|| {
            let assets =
                std::env::var_os("ANYQ_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"));
            let path = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
            assert!(path.exists(), "{} is missing: run scripts/install-assets", path.display());
            let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
            tokenizer_from_gguf(&file.metadata).unwrap_or_else(|e| panic!("{e}"))
        })
    }

    fn fixture(name: &str, regenerate: &str) -> serde_json::Value {
        let path = repo_root().join("tests/fixtures").join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (regenerate it with {regenerate})", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn ids_of(v: &serde_json::Value) -> Vec<u32> {
        v.as_array().expect("ids array").iter().map(|i| i.as_u64().expect("id") as u32).collect()
    }

    /// Compares `cases` ({text, ids}) against the tokenizer; returns how many were checked.
    fn check_cases(cases: &[serde_json::Value], what: &str) -> usize {
        let (tok, _) = smollm2();
        for case in cases {
            let text = case["text"].as_str().expect("text");
            let expected = ids_of(&case["ids"]);
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(ids, expected, "{what}: ids of {text:?}");
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{what}: decode of {text:?}");
        }
        cases.len()
    }

    #[test]
    fn smollm2_matches_tokenizers_reference() {
        let f = fixture("smollm2_tokens.json", "scripts/tokenizer_fixture.py");
        let n = check_cases(f["cases"].as_array().expect("cases"), "smollm2_tokens.json");
        assert!(n >= 15, "only {n} cases");
    }

    #[test]
    fn smollm2_matches_transformers_reference() {
        let f = fixture("smollm2_reference.json", "scripts/make-fixtures");
        let mut cases = f["tokenization"].as_array().expect("tokenization").clone();
        cases.extend(f["prompts"].as_array().expect("prompts").iter().cloned());
        assert!(check_cases(&cases, "smollm2_reference.json") > 0);
    }

    #[test]
    fn smollm2_special_tokens() {
        let (tok, special) = smollm2();
        assert_eq!((special.bos, special.eos, special.add_bos, special.add_eos), (Some(1), Some(2), false, false));
        assert!(special.is_stop(2) && special.is_stop(0) && !special.is_stop(1), "{:?}", special.stop);
        for (text, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
            assert_eq!(tok.encode(text, false).unwrap().get_ids(), [id], "{text}");
            assert_eq!(tok.encode(text, true).unwrap().get_ids(), [id], "{text}: nothing added");
        }
        let ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n", true).unwrap().get_ids().to_vec();
        assert_eq!((ids[0], ids[ids.len() - 2]), (1, 2));
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi\n");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn smollm2_round_trips() {
        let (tok, _) = smollm2();
        let mut texts: Vec<String> = [
            "plain ASCII text, with punctuation: (a) [b] {c}!?",
            "0 1 22 333 4444 55555 3.14159 1,000,000 -42 1e-9",
            "Ünïcödé — “smart quotes” ‘x’ … ½ ² ٣٤ 日本語 中文 한국어 עברית العربية 😀👍🏽👨‍👩‍👧",
            "     five spaces,\t\ttwo tabs,\n\n\nthree newlines\r\n crlf \u{a0}nbsp\u{2003}em",
            "\n",
            " ",
            "trailing spaces   ",
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n",
            "<|im_start <|im_end| |im_start|> <|unknown|>",
        ]
        .map(String::from)
        .to_vec();
        // Slices of every novel, at char boundaries.
        let dir = std::env::var_os("ANYQ_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"));
        for entry in std::fs::read_dir(dir.join("text")).expect("assets/text: run scripts/install-assets") {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let chars: Vec<char> = text.chars().collect();
            for start in [0, chars.len() / 2] {
                texts.push(chars[start..(start + 4000).min(chars.len())].iter().collect());
            }
        }
        assert!(texts.len() > 12, "no novels found");
        for text in &texts {
            round_trip(tok, text);
        }
    }
}
