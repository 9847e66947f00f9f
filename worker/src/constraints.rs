//! The driver rank's output constraints: one llguidance matcher per constrained sequence, fed
//! the sequence's output tokens as they come back as input, and the masks of a step computed
//! on a thread of their own while the forward pass runs (they depend only on tokens the step
//! already has).
//!
//! A sequence's constraint starts where its kept tokens start afresh (a chunk at position 0,
//! or one with a `history`): that chunk carries the grammar, and every output token before and
//! in it is fed to the new matcher. A preempted or moved sequence, whose output is re-fed as
//! prompt, so re-derives the same state from its tokens.

use std::collections::HashMap;
use std::path::PathBuf;

use cluster::ModelConfig;
use cluster::constraint::{ConstraintError, Grammars, Matcher};

/// One constrained sequence.
struct SeqConstraint {
    grammar: String,
    /// Built on the first mask (off the step's critical path).
    matcher: Option<Matcher>,
    /// Output tokens not yet fed to the matcher.
    pending: Vec<u32>,
    /// Set once the matcher failed: the sequence gets this error, not a token.
    failed: Option<String>,
}

/// The constraints of the sequences a driver rank samples.
pub struct Constraints {
    /// The checkpoint's `tokenizer.json`, and the model the grammars are compiled for.
    tokenizer: Option<PathBuf>,
    config: ModelConfig,
    /// Built from `tokenizer` when the first constrained sequence needs it.
    grammars: Option<Result<Grammars, ConstraintError>>,
    seqs: HashMap<u64, SeqConstraint>,
}

impl Constraints {
    pub fn new(config: &ModelConfig) -> Self {
        Constraints { tokenizer: None, config: config.clone(), grammars: None, seqs: HashMap::new() }
    }

    /// The checkpoint's `tokenizer.json` (read when the first constrained sequence comes).
    pub fn set_tokenizer(&mut self, path: PathBuf) {
        self.tokenizer = Some(path);
        self.grammars = None;
    }

    /// Records a chunk of sequence `id`: `tokens` at `start_pos`, output from `prompt_len` on.
    /// With `grammar` the constraint starts afresh from `history` (the tokens before
    /// `start_pos`); without, a constrained sequence continues.
    pub fn record(&mut self, id: u64, grammar: Option<&str>, history: &[u32], tokens: &[u32], start_pos: usize, prompt_len: usize) {
        if let Some(grammar) = grammar {
            let output = |from: usize, toks: &[u32]| toks.iter().enumerate().filter(move |(i, _)| from + i >= prompt_len).map(|(_, &t)| t).collect::<Vec<_>>();
            let mut pending = output(0, history);
            pending.extend(output(start_pos, tokens));
            self.seqs.insert(id, SeqConstraint { grammar: grammar.to_owned(), matcher: None, pending, failed: None });
        } else if let Some(c) = self.seqs.get_mut(&id) {
            let from = start_pos.max(prompt_len) - start_pos;
            c.pending.extend(tokens.iter().skip(from));
        }
    }

    pub fn is_constrained(&self, id: u64) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Forgets sequences that ended.
    pub fn release(&mut self, ids: &[u64]) {
        for id in ids {
            self.seqs.remove(id);
        }
    }

    /// The mask of each of `ids` (constrained sequences sampling this step), or why there is
    /// none.
    pub fn masks(&mut self, ids: &[u64]) -> Vec<Result<Vec<u32>, String>> {
        if self.grammars.is_none() {
            self.grammars = Some(self.load());
        }
        let grammars = match self.grammars.as_ref().expect("loaded") {
            Ok(g) => g.clone(),
            Err(e) => return ids.iter().map(|_| Err(e.to_string())).collect(),
        };
        ids.iter()
            .map(|id| {
                let c = self.seqs.get_mut(id).ok_or_else(|| format!("sequence {id} has no constraint"))?;
                if let Some(e) = &c.failed {
                    return Err(e.clone());
                }
                let mask = Self::advance(&grammars, c).map_err(|e| e.to_string());
                if let Err(e) = &mask {
                    c.failed = Some(e.clone());
                }
                mask
            })
            .collect()
    }

    fn advance(grammars: &Grammars, c: &mut SeqConstraint) -> Result<Vec<u32>, ConstraintError> {
        let matcher = match &mut c.matcher {
            Some(m) => m,
            None => c.matcher.insert(grammars.matcher(&c.grammar)?),
        };
        matcher.consume(&std::mem::take(&mut c.pending))?;
        matcher.mask()
    }

    fn load(&self) -> Result<Grammars, ConstraintError> {
        let path = self.tokenizer.as_ref().ok_or_else(|| ConstraintError::Unavailable("the worker has no tokenizer.json for this model".into()))?;
        Grammars::for_model(path, &self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn constraints() -> Constraints {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral-v3-tiny");
        let mut c = Constraints::new(&ModelConfig::from_file(&dir.join("config.json")).unwrap());
        c.set_tokenizer(dir.join("tokenizer.json"));
        c
    }

    fn grammar(rx: &str) -> String {
        serde_json::to_string(&cluster::constraint::Constraint::Regex(rx.into()).grammar()).unwrap()
    }

    #[test]
    fn the_output_before_a_restart_is_fed_again_and_the_prompt_is_not() {
        let tok = cluster::Tokenizer::from_file(&constraints().tokenizer.unwrap()).unwrap();
        let ab = tok.encode("ab", false).unwrap();
        let (mut fresh, mut moved) = (constraints(), constraints());
        // Prompt [1, 1, 1]; the output so far " ab" comes one token at a time, or re-fed.
        fresh.record(7, Some(&grammar(" ?abc")), &[], &[1, 1, 1], 0, 3);
        let first = fresh.masks(&[7]).remove(0).unwrap();
        let mut last = first.clone();
        for (i, &t) in ab.iter().enumerate() {
            fresh.record(7, None, &[], &[t], 3 + i, 3);
            last = fresh.masks(&[7]).remove(0).unwrap();
        }
        let prompt: Vec<u32> = [1, 1, 1].iter().chain(&ab).copied().collect();
        moved.record(7, Some(&grammar(" ?abc")), &prompt[..2], &prompt[2..], 2, 3);
        let after = moved.masks(&[7]).remove(0).unwrap();
        assert_ne!(first, after);
        assert_eq!(last, after);
        // A token the grammar does not allow fails the sequence, and it stays failed.
        moved.record(7, None, &[], &[ab[0]], 5, 3);
        assert!(moved.masks(&[7]).remove(0).is_err());
        assert!(moved.masks(&[7]).remove(0).is_err());
        moved.release(&[7]);
        assert!(!moved.is_constrained(7));
    }
}
