//! Changes to a row of logits before a token is chosen, in vLLM's order: the output
//! constraint's mask (tokens it does not allow cannot be chosen), the logit bias and
//! min_tokens (stop tokens masked until that many are generated), then the penalties on
//! tokens already in the sequence — repetition (HF/vLLM: a positive logit divided by it, a
//! negative one multiplied, for every token of the prompt and the output), then frequency
//! (times the token's count in the output) and presence (once if it is there), subtracted.
//! They depend only on the request and the sequence's tokens, so a moved or recomputed
//! sequence is adjusted the same way.

use std::collections::{HashMap, HashSet};

use super::SamplingParams;

/// Most entries a request's `logit_bias` may hold.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// Penalties on tokens already in a sequence (OpenAI's presence and frequency penalties on its
/// output, vLLM's repetition penalty on its prompt and output).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalties {
    /// 0 = off; in [-2, 2].
    pub presence: f32,
    /// 0 = off; in [-2, 2].
    pub frequency: f32,
    /// 1 = off; > 0.
    pub repetition: f32,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties { presence: 0.0, frequency: 0.0, repetition: 1.0 }
    }
}

impl Penalties {
    /// Whether any penalty applies (the sequence's tokens must then be kept).
    pub fn active(&self) -> bool {
        *self != Penalties::default()
    }
}

/// The tokens of a sequence so far, as its penalties need them: every token of prompt and
/// output, and how often each occurs in the output.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    len: usize,
    seen: HashSet<u32>,
    output_counts: HashMap<u32, u32>,
}

impl TokenHistory {
    /// Tokens recorded: the positions `0..len()` of the sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records the sequence's next tokens; those at positions from `prompt_len` on are output.
    pub fn extend(&mut self, tokens: &[u32], prompt_len: usize) {
        for &t in tokens {
            self.seen.insert(t);
            if self.len >= prompt_len {
                *self.output_counts.entry(t).or_default() += 1;
            }
            self.len += 1;
        }
    }
}

/// Whether the logits of a token chosen at `position` are adjusted at all.
pub(super) fn adjusts(params: &SamplingParams, position: usize, history: Option<&TokenHistory>, allowed: Option<&[u32]>) -> bool {
    allowed.is_some() || !params.logit_bias.is_empty() || masks_stops(params, position) || (params.penalties.active() && history.is_some())
}

/// min_tokens: fewer than that many tokens generated before `position`.
fn masks_stops(params: &SamplingParams, position: usize) -> bool {
    position.saturating_sub(params.prompt_len) < params.min_tokens && !params.stop_token_ids.is_empty()
}

/// The logits a token at `position` is chosen from, or `None` where they are the model's own.
pub(super) fn adjust(logits: &[f32], params: &SamplingParams, position: usize, history: Option<&TokenHistory>, allowed: Option<&[u32]>) -> Option<Vec<f32>> {
    if !adjusts(params, position, history, allowed) {
        return None;
    }
    let mut row = logits.to_vec();
    let vocab = row.len();
    if let Some(allowed) = allowed {
        for (t, l) in row.iter_mut().enumerate() {
            if !crate::constraint::allows(allowed, t as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    for &(token, bias) in &params.logit_bias {
        if let Some(l) = row.get_mut(token as usize) {
            *l += bias;
        }
    }
    if masks_stops(params, position) {
        for &t in params.stop_token_ids.iter().filter(|&&t| (t as usize) < vocab) {
            row[t as usize] = f32::NEG_INFINITY;
        }
    }
    let Some(history) = history.filter(|_| params.penalties.active()) else { return Some(row) };
    let Penalties { presence, frequency, repetition } = params.penalties;
    if repetition != 1.0 {
        for &t in history.seen.iter().filter(|&&t| (t as usize) < vocab) {
            let l = &mut row[t as usize];
            *l = if *l > 0.0 { *l / repetition } else { *l * repetition };
        }
    }
    for (&t, &count) in history.output_counts.iter().filter(|&(&t, _)| (t as usize) < vocab) {
        row[t as usize] -= frequency * count as f32 + presence;
    }
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::super::{SamplingParams, sample};
    use super::*;

    fn greedy() -> SamplingParams {
        SamplingParams { prompt_len: 2, ..SamplingParams::default() }
    }

    #[test]
    fn the_bias_and_min_tokens_change_the_choice_not_the_logprobs() {
        let logits = [3.0, 1.0, 0.5, 2.0];
        let biased = SamplingParams { logit_bias: vec![(2, 5.0)], ..greedy() };
        let t = sample(&logits, &biased, 2, None, None);
        assert_eq!(t.token, 2);
        // The logprob is the model's own, not the biased distribution's.
        assert_eq!(t.logprob, super::super::log_softmax(&logits)[2]);
        // Token 0 stops the sequence: masked until two tokens are generated (positions 2, 3).
        let min = SamplingParams { stop_token_ids: vec![0], min_tokens: 2, ..greedy() };
        assert_eq!([2, 3, 4].map(|pos| sample(&logits, &min, pos, None, None).token), [3, 3, 0]);
    }

    #[test]
    fn penalties_follow_their_definitions() {
        // Prompt [1, 3], output [3, 3, 2]: token 3 twice in the output, 1 only in the prompt.
        let mut h = TokenHistory::default();
        h.extend(&[1, 3], 2);
        h.extend(&[3, 3, 2], 2);
        assert_eq!(h.len(), 5);
        let logits = [1.0, 2.0, -1.0, 4.0];
        let p = |presence, frequency, repetition| SamplingParams { penalties: Penalties { presence, frequency, repetition }, ..greedy() };
        assert_eq!(adjust(&logits, &p(0.5, 0.0, 1.0), 5, Some(&h), None).unwrap(), vec![1.0, 2.0, -1.5, 3.5]);
        assert_eq!(adjust(&logits, &p(0.0, 0.25, 1.0), 5, Some(&h), None).unwrap(), vec![1.0, 2.0, -1.25, 3.5]);
        // Repetition covers the prompt too: positive logits divided, negative multiplied.
        assert_eq!(adjust(&logits, &p(0.0, 0.0, 2.0), 5, Some(&h), None).unwrap(), vec![1.0, 1.0, -2.0, 2.0]);
        assert!(adjust(&logits, &greedy(), 5, Some(&h), None).is_none(), "nothing to adjust: the model's logits");
        // Penalties need the history; without it (nothing kept) the row is the model's.
        assert!(adjust(&logits, &p(0.5, 0.0, 1.0), 5, None, None).is_none());
    }

    #[test]
    fn a_constraint_mask_leaves_only_its_tokens() {
        let logits = [1.0, 2.0, -1.0, 4.0];
        // Tokens 0 and 2 allowed: greedy takes 0, a draw never takes 1 or 3.
        let allowed = [0b0101];
        assert_eq!(adjust(&logits, &greedy(), 5, None, Some(&allowed)).unwrap(), vec![1.0, f32::NEG_INFINITY, -1.0, f32::NEG_INFINITY]);
        let t = sample(&logits, &greedy(), 2, None, Some(&allowed));
        assert_eq!(t.token, 0);
        for pos in 0..64 {
            let drawn = sample(&logits, &SamplingParams { temperature: 1.0, seed: 9, ..greedy() }, pos, None, Some(&allowed)).token;
            assert!(drawn == 0 || drawn == 2);
        }
    }
}
