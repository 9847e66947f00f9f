//! Constrained decoding: a request's output held to a grammar (a JSON schema, any JSON object,
//! a regular expression, one of a list of strings, a Lark grammar, Mistral's tool calls) by
//! llguidance, which turns a grammar and the sequence's output so far into the set of tokens
//! that may come next (a mask, applied to the logits before sampling).
//!
//! The coordinator compiles each request's grammar once ([`Grammars::check`]): a grammar
//! llguidance cannot build (an unsupported JSON-schema keyword, a bad regex) is the client's
//! error. What travels to the workers is llguidance's own serialized grammar; the driver rank
//! builds a [`Matcher`] from it when a sequence (re)starts there and feeds it the sequence's
//! output tokens, so a preempted or moved sequence re-derives its state from its tokens.

use std::path::Path;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{ParserFactory, token_bytes_from_tokenizer_json};
use serde_json::Value;

/// Special-token ids of Mistral's v3 tokenizer that the tool-call grammar refers to.
pub const TOOL_CALLS_TOKEN: &str = "[TOOL_CALLS]";

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A value valid against this JSON schema.
    JsonSchema(Value),
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect), whole.
    Lark(String),
}

impl Constraint {
    /// llguidance's grammar for it.
    pub fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(json_layout(serde_json::json!({"type": "object"}))),
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(json_layout(schema.clone())),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            Constraint::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// JSON is written as Python's `json.dumps` writes it (and Mistral's tool calls are): `", "`
/// between items, `": "` after keys, no other whitespace. A model cannot then fill its output
/// with whitespace that the grammar would allow forever. A schema's own `x-guidance` options
/// (llguidance's) win.
pub fn json_layout(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        let layout = serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        let options = map.entry("x-guidance").or_insert_with(|| serde_json::json!({}));
        if let (Value::Object(options), Value::Object(layout)) = (options, layout) {
            for (k, v) in layout {
                options.entry(k).or_insert(v);
            }
        }
    }
    schema
}

/// Why a grammar cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConstraintError {
    /// The tokenizer could not be read into llguidance's token table.
    #[error("constrained decoding is unavailable for this model: {0}")]
    Unavailable(String),
    /// llguidance refuses the grammar (its message names what it does not support).
    #[error("{0}")]
    Grammar(String),
    /// The matcher failed on the sequence's tokens (a grammar that cannot go on, say).
    #[error("the output constraint failed: {0}")]
    Matcher(String),
}

/// A model's grammar compiler: its token table and llguidance's parser factory, shared by every
/// request.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    vocab_size: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.vocab_size).finish()
    }
}

impl Grammars {
    /// From the checkpoint's `tokenizer.json`; `vocab_size` is the width of the model's logits
    /// (ids past the tokenizer's are never allowed), `eos` the token that ends a sequence.
    pub fn from_tokenizer_file(path: &Path, vocab_size: usize, eos: u32) -> Result<Self, ConstraintError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConstraintError::Unavailable(format!("{}: {e}", path.display())))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ConstraintError::Unavailable(format!("{}: {e}", path.display())))?;
        Self::from_tokenizer_json(&json, vocab_size, eos)
    }

    /// For `config`'s model: its logits' width, and its first EOS (Mistral's `</s>`, 2, when
    /// the config names none).
    pub fn for_model(tokenizer: &Path, config: &crate::ModelConfig) -> Result<Self, ConstraintError> {
        Self::from_tokenizer_file(tokenizer, config.vocab_size, config.eos_token_ids.first().copied().unwrap_or(2))
    }

    pub fn from_tokenizer_json(json: &Value, vocab_size: usize, eos: u32) -> Result<Self, ConstraintError> {
        let unavailable = |e: anyhow::Error| ConstraintError::Unavailable(e.to_string());
        let mut tokens = token_bytes_from_tokenizer_json(json).map_err(unavailable)?;
        if tokens.len() > vocab_size {
            return Err(ConstraintError::Unavailable(format!("the tokenizer has {} tokens, the model's logits {vocab_size}", tokens.len())));
        }
        // Ids the tokenizer does not name (padding of the embedding) can never be produced:
        // special-token names (0xFF first) that no text matches.
        for id in tokens.len()..vocab_size {
            tokens.push(format!("\u{ff}<pad_{id}>").into_bytes());
        }
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, eos), &tokens);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(unavailable)?;
        factory.set_stderr_log_level(0);
        factory.set_buffer_log_level(0);
        Ok(Grammars { factory: Arc::new(factory), vocab_size })
    }

    /// Compiles `grammar` (refusing one llguidance cannot build) and returns the form the
    /// workers receive.
    pub fn check(&self, grammar: &TopLevelGrammar) -> Result<Arc<str>, ConstraintError> {
        let matcher = self.matcher_of(grammar.clone())?;
        if let Some(e) = matcher.0.get_error() {
            return Err(ConstraintError::Grammar(e));
        }
        let wire = serde_json::to_string(grammar).map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        Ok(wire.into())
    }

    /// A matcher at the start of the grammar `wire` (what [`Grammars::check`] returned).
    pub fn matcher(&self, wire: &str) -> Result<Matcher, ConstraintError> {
        let grammar: TopLevelGrammar = serde_json::from_str(wire).map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        self.matcher_of(grammar)
    }

    fn matcher_of(&self, grammar: TopLevelGrammar) -> Result<Matcher, ConstraintError> {
        let parser = self.factory.create_parser(grammar).map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        Ok(Matcher(llguidance::Matcher::new(Ok(parser))))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// A grammar's state over one sequence's output.
pub struct Matcher(llguidance::Matcher);

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matcher").field("stopped", &self.0.is_stopped()).finish()
    }
}

impl Matcher {
    /// Advances over tokens the sequence produced.
    pub fn consume(&mut self, tokens: &[u32]) -> Result<(), ConstraintError> {
        self.0.consume_tokens(tokens).map_err(matcher_error)
    }

    /// The tokens allowed next, one bit each (bit `t % 32` of word `t / 32`): EOS alone once the
    /// grammar is complete and cannot go on; EOS among others wherever it may end.
    pub fn mask(&mut self) -> Result<Vec<u32>, ConstraintError> {
        let mask = self.0.compute_mask_or_eos().map_err(matcher_error)?;
        if mask.is_zero() {
            return Err(ConstraintError::Matcher("no token can continue the output".into()));
        }
        Ok(mask.as_slice().to_vec())
    }
}

/// llguidance's error, its first line (the rest dumps the parser's state).
fn matcher_error(e: anyhow::Error) -> ConstraintError {
    ConstraintError::Matcher(e.to_string().lines().next().unwrap_or_default().to_owned())
}

/// Whether bit `token` of a [`Matcher::mask`] is set.
pub fn allows(mask: &[u32], token: u32) -> bool {
    mask.get(token as usize / 32).is_some_and(|w| w >> (token % 32) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammars() -> (Grammars, crate::Tokenizer) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mixtral-v3-tiny/tokenizer.json");
        (Grammars::from_tokenizer_file(&path, 32768, 2).unwrap(), crate::Tokenizer::from_file(&path).unwrap())
    }

    /// Greedy over a constant preference: the lowest allowed id that is not EOS, EOS once alone.
    fn run(g: &Grammars, c: &Constraint, prefer: impl Fn(u32) -> i64) -> Vec<u32> {
        let wire = g.check(&c.grammar()).unwrap();
        let mut m = g.matcher(&wire).unwrap();
        let mut out = Vec::new();
        for _ in 0..200 {
            let mask = m.mask().unwrap();
            let t = (0..32768u32).filter(|&t| allows(&mask, t)).max_by_key(|&t| prefer(t)).unwrap();
            if t == 2 {
                return out;
            }
            m.consume(&[t]).unwrap();
            out.push(t);
        }
        panic!("no end within 200 tokens");
    }

    #[test]
    fn a_choice_and_a_regex_are_followed_to_their_end() {
        let (g, tok) = grammars();
        let choice = Constraint::Choice(vec!["yes".into(), "no way".into()]);
        let text = tok.decode(&run(&g, &choice, |t| -(t as i64)), false).unwrap();
        assert!(text == "yes" || text == "no way", "{text:?}");
        let rx = Constraint::Regex("[0-9]{3}-[a-c]{2}".into());
        let text = tok.decode(&run(&g, &rx, |t| t as i64 % 97), false).unwrap();
        assert!(text.len() == 6 && text.as_bytes()[3] == b'-', "{text:?}");
    }

    #[test]
    fn a_json_schema_is_followed_and_a_bad_one_refused() {
        let (g, tok) = grammars();
        let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
                                        "required": ["n"], "additionalProperties": false});
        let text = tok.decode(&run(&g, &Constraint::JsonSchema(schema), |t| -(t as i64)), false).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!((1..=9).contains(&v["n"].as_i64().unwrap()), "{text}");
        let err = g.check(&Constraint::JsonSchema(serde_json::json!({"type": "array", "uniqueItems": true})).grammar()).unwrap_err();
        assert!(err.to_string().contains("uniqueItems"), "{err}");
        assert!(g.check(&Constraint::Regex("(".into()).grammar()).is_err());
    }
}
