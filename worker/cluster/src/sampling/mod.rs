//! Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seeded,
//! position-keyed random stream (the same seed and position always draw the same number, so
//! a sequence re-run elsewhere samples the same tokens), and logprobs. The logits may first be
//! adjusted ([`adjust`]: logit bias, min_tokens, penalties); logprobs are always those of the
//! model's own distribution.

mod adjust;

use crate::embedding::Pooling;

pub use adjust::{MAX_LOGIT_BIAS, Penalties, TokenHistory};

/// How a request wants its tokens chosen. Validated at the edge by [`SamplingParams::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: usize,
    /// Tokens that end the generation (included in the output, like EOS).
    pub stop_token_ids: Vec<u32>,
    /// Alternatives to report with each sampled token's logprob; `None` = no logprobs.
    pub logprobs: Option<usize>,
    /// Alternatives to report with each prompt token's logprob; `None` = no prompt logprobs.
    pub prompt_logprobs: Option<usize>,
    /// Added to these tokens' logits before a token is chosen (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Penalties on the tokens already in the sequence.
    pub penalties: Penalties,
    /// The stop tokens cannot be chosen before this many tokens are generated.
    pub min_tokens: usize,
    /// Tokens of the request's own prompt: the sequence's tokens from here on are its output
    /// (the prompt a replica is given holds the output so far too, after a move).
    pub prompt_len: usize,
    /// An embedding request: the prompt's final hidden states pooled are the answer, and
    /// nothing is generated.
    pub embed: Option<Pooling>,
    /// The grammar the output is held to ([`crate::constraint`], serialized as the workers
    /// receive it: once per start of the sequence's kept tokens, not with every step).
    pub grammar: Option<std::sync::Arc<str>>,
}

impl SamplingParams {
    /// Whether the workers keep the sequence's tokens: its penalties or its grammar need
    /// them.
    pub fn keeps_history(&self) -> bool {
        self.penalties.active() || self.grammar.is_some()
    }
}

/// Most alternatives a request may ask for per position.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            penalties: Penalties::default(),
            min_tokens: 0,
            prompt_len: 0,
            embed: None,
            grammar: None,
        }
    }
}

/// A sampling field out of its range: each variant names the field and its limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error("`temperature` must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("`top_p` must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("`top_k` must be <= {vocab} (the vocabulary), got {got}")]
    TopK { got: usize, vocab: usize },
    #[error("`max_tokens` must be >= 1, got 0")]
    MaxTokensZero,
    #[error("`{field}` must be <= {MAX_TOP_LOGPROBS}, got {got}")]
    TooManyAlternatives { field: &'static str, got: usize },
    #[error("`stop_token_ids` must be < {vocab} (the vocabulary), got {got}")]
    StopTokenId { got: u32, vocab: usize },
    #[error("`{field}` must be in [-2, 2], got {got}")]
    Penalty { field: &'static str, got: f32 },
    #[error("`repetition_penalty` must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
    #[error(
        "`logit_bias` must hold at most {MAX_LOGIT_BIAS} token ids, each < {vocab} (the vocabulary), with values in [-100, 100]; got {token}: {bias} of {count}"
    )]
    LogitBias { token: u32, bias: f32, count: usize, vocab: usize },
    #[error("`min_tokens` must be <= `max_tokens` ({max_tokens}), got {got}")]
    MinTokens { got: usize, max_tokens: usize },
}

impl ParamError {
    /// The request field at fault, as clients name it.
    pub fn field(&self) -> &'static str {
        match self {
            ParamError::Temperature(_) => "temperature",
            ParamError::TopP(_) => "top_p",
            ParamError::TopK { .. } => "top_k",
            ParamError::MaxTokensZero => "max_tokens",
            ParamError::TooManyAlternatives { field, .. } => field,
            ParamError::StopTokenId { .. } => "stop_token_ids",
            ParamError::Penalty { field, .. } => field,
            ParamError::RepetitionPenalty(_) => "repetition_penalty",
            ParamError::LogitBias { .. } => "logit_bias",
            ParamError::MinTokens { .. } => "min_tokens",
        }
    }
}

impl SamplingParams {
    /// Checks every field; the error names the field and its limit.
    pub fn validate(&self, vocab_size: usize) -> Result<(), ParamError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ParamError::Temperature(self.temperature));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(ParamError::TopP(self.top_p));
        }
        if self.top_k > vocab_size {
            return Err(ParamError::TopK { got: self.top_k, vocab: vocab_size });
        }
        if self.max_tokens == 0 {
            return Err(ParamError::MaxTokensZero);
        }
        for (field, n) in [("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)] {
            if let Some(got) = n.filter(|&n| n > MAX_TOP_LOGPROBS) {
                return Err(ParamError::TooManyAlternatives { field, got });
            }
        }
        if let Some(&got) = self.stop_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(ParamError::StopTokenId { got, vocab: vocab_size });
        }
        let Penalties { presence, frequency, repetition } = self.penalties;
        for (field, got) in [("presence_penalty", presence), ("frequency_penalty", frequency)] {
            if !(-2.0..=2.0).contains(&got) {
                return Err(ParamError::Penalty { field, got });
            }
        }
        if !repetition.is_finite() || repetition <= 0.0 {
            return Err(ParamError::RepetitionPenalty(repetition));
        }
        let count = self.logit_bias.len();
        let bad_bias = |&&(token, bias): &&(u32, f32)| count > MAX_LOGIT_BIAS || token as usize >= vocab_size || !(-100.0..=100.0).contains(&bias);
        if let Some(&(token, bias)) = self.logit_bias.iter().find(bad_bias) {
            return Err(ParamError::LogitBias { token, bias, count, vocab: vocab_size });
        }
        if self.min_tokens > self.max_tokens {
            return Err(ParamError::MinTokens { got: self.min_tokens, max_tokens: self.max_tokens });
        }
        Ok(())
    }
}

/// A token with its logprob under the model's (untempered) distribution, and the most
/// likely alternatives, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of one row of logits, in f64 accumulation for stability.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_z = log_normaliser(logits);
    logits.iter().map(|&l| (l as f64 - log_z) as f32).collect()
}

/// `log Σ exp(l)` over a row of logits: the max taken out first, each exponential taken in f32
/// (its argument is <= 0: within an ulp of the f64 value, and cheaper) and summed in f64
/// over eight interleaved partial sums (a fixed order, so the same row always gives the same
/// bits).
fn log_normaliser(logits: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut max = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks.clone() {
        for (m, &l) in max.iter_mut().zip(c) {
            *m = m.max(l);
        }
    }
    let max = rest.iter().chain(&max).copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = [0f64; LANES];
    for c in chunks {
        for (s, &l) in sum.iter_mut().zip(c) {
            *s += (l - max).exp() as f64;
        }
    }
    let sum = rest.iter().map(|&l| (l - max).exp() as f64).chain(sum).sum::<f64>();
    max as f64 + sum.ln()
}

/// The `n` largest entries of `values` as (index, value), largest first, ties by index.
pub fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(values.len());
    if n <= SCAN_TOP_N {
        // One pass, keeping the best `n` (key, index) in order: a vocabulary of logits is
        // scanned once instead of sorting its indices. A later index never beats an equal key.
        let mut top: Vec<(i32, usize)> = Vec::with_capacity(n + 1);
        for (i, &v) in values.iter().enumerate() {
            let key = total_order_key(v);
            // Full (always, for n = 0) and not above the n-th: nothing moves.
            if top.len() == n && top.last().is_none_or(|t| key <= t.0) {
                continue;
            }
            let at = top.partition_point(|t| t.0 >= key);
            top.insert(at, (key, i));
            top.truncate(n);
        }
        return top.into_iter().map(|(_, i)| (i as u32, values[i])).collect();
    }
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

/// An integer that orders like [`f32::total_cmp`] (the same transform it applies).
fn total_order_key(v: f32) -> i32 {
    let bits = v.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// Up to this many entries, [`top_n`] keeps them in one pass over the values; more (a wide
/// `top_k`) select over sorted indices.
const SCAN_TOP_N: usize = 64;

/// Logprob of `token` under `logits`, with `n` alternatives. Without alternatives, only the
/// normaliser and the token's own logprob are computed (the same values as
/// [`log_softmax`]'s).
pub fn token_logprobs(logits: &[f32], token: u32, n: usize) -> TokenLogprobs {
    if n == 0 {
        let log_z = log_normaliser(logits);
        return TokenLogprobs { token, logprob: (logits[token as usize] as f64 - log_z) as f32, top: Vec::new() };
    }
    let lp = log_softmax(logits);
    TokenLogprobs { token, logprob: lp[token as usize], top: top_n(&lp, n) }
}

/// Chooses the next token. `position` is the index the token will take in its sequence;
/// with the seed it keys the random draw.
pub fn sample(logits: &[f32], params: &SamplingParams, position: usize, history: Option<&TokenHistory>, allowed: Option<&[u32]>) -> TokenLogprobs {
    let adjusted = adjust::adjust(logits, params, position, history, allowed);
    let row = adjusted.as_deref().unwrap_or(logits);
    let token = if params.temperature == 0.0 { top_n(row, 1)[0].0 } else { draw(row, params, uniform(params.seed, position)) };
    token_logprobs(logits, token, params.logprobs.unwrap_or(0))
}

/// The uniform draw in [0, 1) that sampling uses for `seed` at `position`.
pub fn uniform(seed: u64, position: usize) -> f64 {
    let mut state = seed ^ (position as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64
}

/// What a step wants from one row of logits.
#[derive(Debug, Clone, Copy)]
pub enum RowChoice<'a> {
    /// Nothing (a prompt chunk's last row when nothing is sampled).
    Skip,
    /// The logprob of a known `token` (the next prompt token) with `top_n` alternatives.
    Score { token: u32, top_n: usize },
    /// A token chosen by `params`; `position` is the index it takes in its sequence,
    /// `history` the sequence's tokens before it where its penalties need them, and `allowed`
    /// the tokens its output constraint allows (a bit each, see
    /// [`crate::constraint::Matcher::mask`]) where it has one.
    Sample { params: &'a SamplingParams, position: usize, history: Option<&'a TokenHistory>, allowed: Option<&'a [u32]> },
}

impl RowChoice<'_> {
    /// Whether the row's logits are changed before the choice ([`adjust`]).
    pub fn adjusts(&self) -> bool {
        match *self {
            RowChoice::Sample { params, position, history, allowed } => adjust::adjusts(params, position, history, allowed),
            _ => false,
        }
    }
}

/// [`RowChoice`] carried out on one host row of logits.
pub fn choose(logits: &[f32], choice: &RowChoice<'_>) -> Option<TokenLogprobs> {
    match *choice {
        RowChoice::Skip => None,
        RowChoice::Score { token, top_n } => Some(token_logprobs(logits, token, top_n)),
        RowChoice::Sample { params, position, history, allowed } => Some(sample(logits, params, position, history, allowed)),
    }
}

/// Inverse-CDF draw at `u` in [0, 1) from the tempered, top-k and top-p filtered distribution
/// (the nucleus is the most likely tokens; ties at its edge are cut by id).
fn draw(logits: &[f32], params: &SamplingParams, u: f64) -> u32 {
    let k = if params.top_k == 0 { logits.len() } else { params.top_k };
    let mut cand = top_n(logits, k);
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| (((l - max) / params.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cum += p;
                cum >= params.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        cand.truncate(keep);
        probs.truncate(keep);
        let kept: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= kept);
    }
    // The draw walks the kept tokens in id order, as the GPU backend's sampler does.
    let mut kept: Vec<(u32, f64)> = cand.iter().map(|c| c.0).zip(probs).collect();
    kept.sort_by_key(|k| k.0);
    let mut cum = 0.0;
    for &(id, p) in &kept {
        cum += p;
        if u < cum {
            return id;
        }
    }
    kept[kept.len() - 1].0
}

/// SplitMix64: a small, well-mixed 64-bit generator (Steele et al., 2014).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed, logprobs: Some(2), ..Default::default() }
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_logprobs() {
        let logits = [0.0, 3.0, 1.0, 3.0];
        let s = sample(&logits, &params(0.0, 0, 1.0, 0), 5, None, None);
        assert_eq!(s.token, 1, "ties go to the lowest id");
        let lp = log_softmax(&logits);
        assert!((s.logprob - lp[1]).abs() < 1e-7);
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln(), f32::NEG_INFINITY];
        let p = params(1.0, 0, 1.0, 42);
        let mut counts = [0usize; 4];
        for pos in 0..8000 {
            let a = sample(&logits, &p, pos, None, None).token;
            assert_eq!(a, sample(&logits, &p, pos, None, None).token);
            counts[a as usize] += 1;
        }
        // Expected 1/8, 2/8, 5/8 of 8000 = 1000, 2000, 5000.
        assert_eq!(counts[3], 0);
        for (got, want) in counts.iter().zip([1000.0, 2000.0, 5000.0]) {
            assert!((*got as f64 - want).abs() < 0.06 * want, "{counts:?}");
        }
        let other: Vec<u32> = (0..64).map(|pos| sample(&logits, &params(1.0, 0, 1.0, 43), pos, None, None).token).collect();
        let same: Vec<u32> = (0..64).map(|pos| sample(&logits, &p, pos, None, None).token).collect();
        assert_ne!(other, same, "another seed draws another stream");
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [1.0f32, 2.0, 3.0, 4.0];
        for pos in 0..500 {
            let t = sample(&logits, &params(1.0, 2, 1.0, 7), pos, None, None).token;
            assert!(t == 3 || t == 2);
            // p(3) = 0.64, p(2) = 0.24: top_p 0.5 keeps only token 3.
            assert_eq!(sample(&logits, &params(1.0, 0, 0.5, 7), pos, None, None).token, 3);
        }
    }

    #[test]
    fn the_one_pass_top_n_ranks_like_sorting_every_index() {
        // Ties, infinities and NaN (which total_cmp ranks above +inf) included.
        let mut state = 3u64;
        let mut values: Vec<f32> = (0..5000).map(|_| (splitmix64(&mut state) % 200) as f32 / 8.0 - 12.0).collect();
        values[17] = f32::INFINITY;
        values[4000] = f32::NAN;
        values[9] = f32::NEG_INFINITY;
        for n in [0, 1, 2, 5, 20, SCAN_TOP_N, SCAN_TOP_N + 1, 300] {
            let mut idx: Vec<u32> = (0..values.len() as u32).collect();
            idx.sort_by(|a, b| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b)));
            let want: Vec<u32> = idx[..n].to_vec();
            let got: Vec<u32> = top_n(&values, n).into_iter().map(|t| t.0).collect();
            assert_eq!(got, want, "n = {n}");
        }
        assert_eq!(top_n(&[1.0, 1.0], 5), vec![(0, 1.0), (1, 1.0)]);
    }

    #[test]
    fn a_logprob_alone_equals_the_log_softmax_entry() {
        let mut state = 11u64;
        let logits: Vec<f32> = (0..32000).map(|_| (splitmix64(&mut state) % 10_000) as f32 / 700.0 - 7.0).collect();
        let lp = log_softmax(&logits);
        for token in [0u32, 1234, 31999] {
            let alone = token_logprobs(&logits, token, 0);
            assert_eq!(alone.logprob.to_bits(), lp[token as usize].to_bits());
            assert!(alone.top.is_empty());
            assert_eq!(token_logprobs(&logits, token, 3).logprob.to_bits(), alone.logprob.to_bits());
        }
    }

    #[test]
    fn validation_names_the_field_and_limit() {
        let bad = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            let e = p.validate(100).unwrap_err();
            (e.field(), e.to_string())
        };
        type Case = (fn(&mut SamplingParams), &'static str, &'static str);
        let cases: [Case; 8] = [
            (|p| p.temperature = f32::NAN, "temperature", "finite"),
            (|p| p.temperature = -1.0, "temperature", ">= 0"),
            (|p| p.top_p = 0.0, "top_p", "(0, 1]"),
            (|p| p.top_p = 1.5, "top_p", "1.5"),
            (|p| p.top_k = 101, "top_k", "<= 100"),
            (|p| p.max_tokens = 0, "max_tokens", ">= 1"),
            (|p| p.logprobs = Some(21), "logprobs", "<= 20"),
            (|p| p.stop_token_ids = vec![100], "stop_token_ids", "< 100"),
        ];
        for (f, field, limit) in cases {
            let (got_field, message) = bad(f);
            assert_eq!(got_field, field);
            assert!(message.contains(field) && message.contains(limit), "{message}");
        }
        assert!(SamplingParams::default().validate(100).is_ok());
    }
}
