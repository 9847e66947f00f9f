//! The model's tokenizer (`tokenizer.json`) and incremental detokenization that never emits
//! broken UTF-8: bytes of a character split across byte-fallback tokens are held back until
//! the character is complete.

use std::path::Path;

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer { path: path.to_owned(), message: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes `text`, adding BOS when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids of `text` as it tokenizes after other text: without the space a sentencepiece
    /// tokenizer puts before a text's start (tokenized behind a sentinel character, whose
    /// tokens are then dropped, as mistral-common does).
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        const SENTINEL: &str = "\u{263A}";
        let enc = self.inner.encode(format!("{SENTINEL}{text}"), false).map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().iter().zip(enc.get_offsets()).filter(|&(_, &(start, _))| start >= SENTINEL.len()).map(|(&id, _)| id).collect())
    }

    /// Mistral's fill-in-the-middle prompt (mistral-common's `encode_fim`):
    /// `<s>[SUFFIX]`suffix`[PREFIX]`prompt, the suffix as a continuation
    /// ([`Tokenizer::encode_continuation`]), the prompt as a text's start; the model writes the
    /// middle. `None` when the tokenizer has no `[SUFFIX]`/`[PREFIX]` tokens.
    pub fn encode_fim(&self, prompt: &str, suffix: &str) -> Result<Option<Vec<u32>>> {
        let ids = ["<s>", "[SUFFIX]", "[PREFIX]"].map(|t| self.inner.token_to_id(t));
        let [Some(bos), Some(suffix_id), Some(prefix_id)] = ids else { return Ok(None) };
        let mut out = vec![bos, suffix_id];
        if !suffix.is_empty() {
            out.extend(self.encode_continuation(suffix)?);
        }
        out.push(prefix_id);
        out.extend(self.encode(prompt, false)?);
        Ok(Some(out))
    }

    /// The id of a token by its text (a control token's, say `[TOOL_CALLS]`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether the tokenizer has the fill-in-the-middle control tokens.
    pub fn has_fim(&self) -> bool {
        ["[SUFFIX]", "[PREFIX]"].iter().all(|t| self.inner.token_to_id(t).is_some())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenize(e.to_string()))
    }

    /// Whether `id` is a special token (BOS, EOS, control tokens): text it decodes to is
    /// left out of decoded text.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// Where the text of each of `ids` starts, in characters (as clients index strings),
    /// in the text they decode to after `context` without special tokens: a special token,
    /// or a byte that waits for the rest of its character, starts where the next text will.
    pub fn text_offsets(&self, context: &[u32], ids: &[u32]) -> Result<Vec<usize>> {
        let mut decoder = IncrementalDecoder::new(context, true);
        let mut chars = 0;
        let mut offsets = Vec::with_capacity(ids.len());
        for &id in ids {
            offsets.push(chars);
            if !self.is_special(id) {
                chars += decoder.push(self, id)?.chars().count();
            }
        }
        Ok(offsets)
    }

    /// The token's text as it would appear in context, for logprob reports.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Turns a growing list of token ids into text deltas.
///
/// Decoding tokens one by one loses the leading-space handling of sentencepiece-style
/// tokenizers and splits multi-byte characters, so each delta is the difference between
/// decoding a short window of recent tokens with and without the newest ones, emitted only
/// once it no longer ends in an incomplete character (U+FFFD).
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// End of the text already emitted (in tokens).
    read_offset: usize,
    /// Leave special tokens (EOS, control tokens) out of the text.
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// Starts after `prompt`: its text is never emitted, but it gives context.
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let keep = prompt.len().min(6);
        IncrementalDecoder { ids: prompt[prompt.len() - keep..].to_vec(), prefix_offset: 0, read_offset: keep, skip_special_tokens }
    }

    /// Adds one token; returns the text that became final.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the end of generation).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_owned())
    }
}
