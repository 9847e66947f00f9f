//! `/v1/completions` and `/v1/chat/completions`: the request shapes of OpenAI's API (with
//! Mistral's and vLLM's additions), `n` choices, JSON or SSE.

use std::convert::Infallible;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cluster::scheduler::Finish;
use cluster::{TokenLogprobs, Tokenizer};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Api, ApiError, check_model, now, structured};
use crate::auth::Caller;
use crate::chat::Message;
use crate::frontend::{Chunk, Frontend, FrontendError, Generation, Served};
use crate::tools::{self, Tool, ToolChoice};
use crate::validate::{PromptInput, RawRequest, RequestError};
use cluster::constraint::Constraint;

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    /// A last chunk, with no choices, carries the request's usage.
    #[serde(default)]
    include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    /// `random_seed` in Mistral's API.
    #[serde(alias = "random_seed")]
    seed: Option<u64>,
    stop: Option<StopField>,
    stop_token_ids: Option<Vec<u32>>,
    skip_special_tokens: Option<bool>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    /// Token id (a string, as JSON keys are) -> bias.
    logit_bias: Option<std::collections::HashMap<String, f32>>,
    min_tokens: Option<u32>,
    ignore_eos: Option<bool>,
    n: Option<u32>,
    /// vLLM's: prefix cache hits only among requests of the same salt.
    cache_salt: Option<String>,
    /// OpenAI's and Mistral's structured output ([`structured::response_format`]).
    response_format: Option<Value>,
    /// vLLM's structured output ([`structured::structured_outputs`]).
    structured_outputs: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// Every other field of the request (the endpoint's own taken out): refused unless null or
    /// at a value that changes nothing ([`neutral`]).
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// Whether an unimplemented field's value leaves the result as this server makes it.
fn neutral(field: &str, v: &Value) -> bool {
    match field {
        // Metadata for the client's own accounting.
        "user" => true,
        "best_of" => v.as_u64() == Some(1),
        "safe_prompt" => v.as_bool() == Some(false),
        "metadata" => v.as_object().is_some_and(serde_json::Map::is_empty),
        // Without tools there is nothing to call, whatever the choice.
        "tools" => v.as_array().is_some_and(Vec::is_empty),
        "tool_choice" => matches!(v.as_str(), Some("auto" | "none")),
        "parallel_tool_calls" => v.is_boolean(),
        _ => v.is_null(),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct CompletionRequest {
    prompt: Option<PromptField>,
    /// The text after the completion: the prompt becomes a fill-in-the-middle one.
    suffix: Option<String>,
    #[serde(default)]
    echo: bool,
    logprobs: Option<u32>,
    #[serde(default)]
    return_tokens_as_token_ids: bool,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    messages: Vec<Message>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    /// Mistral's `safe_prompt`: the guardrail system prompt goes first ([`with_guardrail`]).
    #[serde(default)]
    safe_prompt: bool,
    /// Functions the model may call ([`tools`]).
    #[serde(default, deserialize_with = "crate::chat::null_as_empty")]
    tools: Vec<Tool>,
    tool_choice: Option<Value>,
    /// More than one call in a turn (the default).
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// The system prompt Mistral's API prepends for `safe_prompt: true`
/// (https://docs.mistral.ai/usage/guardrailing).
const GUARDRAIL: &str = "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.";

/// `messages` with the guardrail first: as the system message, or before the request's own
/// system message's text (a blank line between them).
fn with_guardrail(mut messages: Vec<Message>) -> Vec<Message> {
    match messages.first_mut() {
        Some(m) if m.role == "system" => m.content = format!("{GUARDRAIL}\n\n{}", m.content),
        _ => messages.insert(0, Message::new("system", GUARDRAIL)),
    }
    messages
}

/// Checks of the sampling fields that only HTTP has.
fn check_sampling(served: &Served, s: &Sampling) -> Result<(), ApiError> {
    check_model(served, s.model.as_deref())?;
    if s.n.is_some_and(|n| !(1..=MAX_CHOICES).contains(&n)) {
        return Err(RequestError::Shape { field: "n", expected: "in 1..=16" }.into());
    }
    if s.top_k.is_some_and(|k| k < -1) {
        return Err(RequestError::Shape { field: "top_k", expected: "-1 (off) or >= 0" }.into());
    }
    if s.logit_bias.iter().flatten().any(|(k, _)| k.parse::<u32>().is_err()) {
        return Err(RequestError::Shape { field: "logit_bias", expected: "an object whose keys are token ids" }.into());
    }
    if s.stream_options.is_some() && !s.stream {
        return Err(RequestError::Shape { field: "stream_options", expected: "given only with `stream: true`" }.into());
    }
    if let Some((field, v)) = s.other.iter().find(|(f, v)| !neutral(f, v)) {
        return Err(RequestError::Unsupported { field: field.clone(), got: v.to_string() }.into());
    }
    Ok(())
}

/// The request's output constraint, from `response_format` or `structured_outputs`.
fn constraint(s: &Sampling) -> Result<Option<(&'static str, Constraint)>, RequestError> {
    let format = s.response_format.as_ref().filter(|v| !v.is_null());
    let outputs = s.structured_outputs.as_ref().filter(|v| !v.is_null());
    Ok(match (format, outputs) {
        (Some(_), Some(_)) => return Err(RequestError::Combination { field: "structured_outputs", with: "response_format" }),
        (Some(f), None) => structured::response_format(f)?.map(|c| ("response_format", c)),
        (None, Some(o)) => Some(("structured_outputs", structured::structured_outputs(o)?)),
        (None, None) => None,
    })
}

fn raw(s: &Sampling, prompt: PromptInput, max_tokens: Option<u32>, logprobs: Option<u32>, prompt_logprobs: Option<u32>) -> Result<RawRequest, RequestError> {
    Ok(RawRequest {
        prompt: Some(prompt),
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k.map(|k| k.max(0) as u32),
        seed: s.seed,
        max_tokens,
        stop_token_ids: s.stop_token_ids.clone().unwrap_or_default(),
        stop: match &s.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        },
        logprobs,
        prompt_logprobs,
        skip_special_tokens: s.skip_special_tokens,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        logit_bias: s.logit_bias.iter().flatten().filter_map(|(k, &v)| Some((k.parse().ok()?, v))).collect(),
        min_tokens: s.min_tokens,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        embed: None,
        cache_salt: s.cache_salt.clone(),
        constraint: constraint(s)?,
    })
}

/// Starts a request's `n` choices, each a generation of its own: choice `i` draws with the
/// request's seed + `i` (or, with no seed, a fresh one of its own).
fn start_choices(frontend: &Frontend, s: &Sampling, raw: RawRequest, timeout: std::time::Duration) -> Result<Vec<Generation>, ApiError> {
    let n = s.n.unwrap_or(1);
    (0..n)
        .map(|i| {
            let seed = raw.seed.map(|seed| seed.wrapping_add(u64::from(i)));
            Ok(frontend.start(None, RawRequest { seed, ..raw.clone() }, timeout)?)
        })
        .collect()
}

fn finish_name(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::Stop => "stop",
    }
}

fn token_name(tok: &Tokenizer, id: u32, as_ids: bool) -> String {
    if as_ids { format!("token_id:{id}") } else { tok.decode(&[id], false).unwrap_or_default() }
}

/// A whole generation collected: text (stop strings applied), tokens, finish reason, and
/// the prompt's logprobs where asked (one per prompt token after the first).
struct Collected {
    prompt: Vec<u32>,
    text: String,
    tokens: Vec<TokenLogprobs>,
    finish: &'static str,
    prompt_logprobs: Vec<TokenLogprobs>,
    cached_tokens: usize,
}

async fn collect(mut g: Generation) -> Result<Collected, FrontendError> {
    let (mut text, mut tokens, mut finish, mut prompt_logprobs) = (String::new(), Vec::new(), "length", Vec::new());
    while let Some(chunk) = g.next().await {
        match chunk? {
            Chunk::PromptLogprobs(lps) => prompt_logprobs = lps,
            Chunk::Token { token, text: delta, finish: f } => {
                tokens.push(token);
                text.push_str(&delta);
                if let Some(f) = f {
                    finish = finish_name(f);
                }
            }
            Chunk::End(f) => finish = finish_name(f),
            // Generation requests never embed.
            Chunk::Embedding(_) => finish = "stop",
        }
    }
    Ok(Collected { prompt: g.prompt.clone(), text, tokens, finish, prompt_logprobs, cached_tokens: g.cached_tokens() })
}

/// Every choice collected, in order; the first error ends them all (the others are
/// aborted).
async fn collect_all(choices: Vec<Generation>) -> Result<Vec<Collected>, ApiError> {
    let mut tasks = JoinSet::new();
    let n = choices.len();
    for (i, g) in choices.into_iter().enumerate() {
        tasks.spawn(async move { (i, collect(g).await) });
    }
    let mut out: Vec<Option<Collected>> = (0..n).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, collected) = joined.map_err(|e| ApiError::internal(e.to_string()))?;
        out[i] = Some(collected?);
    }
    Ok(out.into_iter().flatten().collect())
}

/// Where a request's usage is counted: its caller's key.
pub(super) struct Account {
    auth: crate::auth::Auth,
    caller: Caller,
}

impl Account {
    pub(super) fn new(frontend: &Frontend, caller: Caller) -> Self {
        Account { auth: frontend.auth.clone(), caller }
    }

    /// Counts what the response reports: prompt (once), cached and completion tokens.
    pub(super) fn record(&self, prompt: usize, cached: usize, completion: usize) {
        self.auth.record(&self.caller, prompt, cached, completion);
    }
}

/// Usage of a request: its prompt counted once, the tokens of every choice; `cached`: the
/// prompt tokens found in the prefix cache (the fewest any choice found: the prompt counted
/// once, its prefill counted once).
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

fn cached_of(collected: &[Collected]) -> usize {
    collected.iter().map(|c| c.cached_tokens).min().unwrap_or(0)
}

/// The `logprobs` object of a completion: its tokens, or with `echo` (`prompt` set: the
/// prompt's first token, which nothing precedes, and the logprobs of the others) the prompt's
/// tokens first, the first one's logprob and top logprobs `null`. `offsets` holds where each
/// token's text starts in the choice's `text` (see [`Tokenizer::text_offsets`]).
fn completion_logprobs(tok: &Tokenizer, prompt: Option<(u32, &[TokenLogprobs])>, tokens: &[TokenLogprobs], offsets: &[usize], as_ids: bool) -> Value {
    let first = prompt.map(|(id, _)| id);
    let all: Vec<&TokenLogprobs> = prompt.map_or(&[][..], |(_, lps)| lps).iter().chain(tokens).collect();
    let names: Vec<String> = first.iter().copied().chain(all.iter().map(|t| t.token)).map(|id| token_name(tok, id, as_ids)).collect();
    let unscored = first.map(|_| Value::Null);
    json!({
        "tokens": names,
        "token_logprobs": unscored.iter().cloned().chain(all.iter().map(|t| json!(t.logprob))).collect::<Vec<_>>(),
        "top_logprobs": unscored.iter().cloned().chain(all.iter().map(|t| {
            Value::Object(t.top.iter().map(|&(id, lp)| (token_name(tok, id, as_ids), json!(lp))).collect())
        })).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// Where each token's text starts in a completion's `text` (characters): with `echo` (`echoed`:
/// the characters of the prompt's text that `text` begins with) the prompt's tokens first,
/// then the completion's after it; never past the end of `text` (a stop string cuts the text,
/// not the tokens).
fn completion_offsets(tok: &Tokenizer, prompt: &[u32], echoed: Option<usize>, completion: &[u32], text: &str) -> Result<Vec<usize>, ApiError> {
    let (mut offsets, mut start) = (Vec::new(), 0);
    if let Some(chars) = echoed {
        offsets = tok.text_offsets(&[], prompt)?;
        start = chars;
    }
    offsets.extend(tok.text_offsets(prompt, completion)?.into_iter().map(|o| start + o));
    let end = text.chars().count();
    Ok(offsets.into_iter().map(|o| o.min(end)).collect())
}

type SseStream = Sse<tokio_stream::wrappers::ReceiverStream<Result<Event, Infallible>>>;

/// Streams a request's choices as SSE, each token of any choice as it comes:
/// `chunk(choice, delta_text, tokens, finish)` builds each payload (`None`: nothing to send
/// yet, a tool call being written); with `usage` (the request's
/// `stream_options.include_usage`) a last payload, `usage(usage_object)`, has no choices; then
/// `[DONE]`. An error ends the stream with an error event (the other choices are aborted);
/// a stream that ended whole is counted to its caller (`account`).
fn stream(
    choices: Vec<Generation>,
    account: Account,
    mut chunk: impl FnMut(usize, &str, &[TokenLogprobs], Option<&str>) -> Option<Value> + Send + 'static,
    usage_chunk: Option<impl FnOnce(Value) -> Value + Send + 'static>,
) -> SseStream {
    let (tx, rx) = mpsc::channel(64);
    let (n, prompt_tokens) = (choices.len(), choices.first().map_or(0, |g| g.prompt.len()));
    let (chunks_tx, mut chunks) = mpsc::channel(64);
    let mut tasks = JoinSet::new();
    let cached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    for (i, mut g) in choices.into_iter().enumerate() {
        let (chunks_tx, cached) = (chunks_tx.clone(), cached.clone());
        tasks.spawn(async move {
            while let Some(c) = g.next().await {
                if chunks_tx.send((i, Some(c))).await.is_err() {
                    return; // the stream ended: dropping the generation aborts it
                }
            }
            cached.fetch_min(g.cached_tokens(), std::sync::atomic::Ordering::Relaxed);
            let _ = chunks_tx.send((i, None)).await;
        });
    }
    drop(chunks_tx);
    tokio::spawn(async move {
        let _tasks = tasks; // aborted with this task: a client gone aborts every choice
        let (mut ended, mut completion_tokens, mut failed) = (0, 0, false);
        while ended < n {
            let Some((i, c)) = chunks.recv().await else { break };
            let payload = match c {
                None => {
                    ended += 1;
                    continue;
                }
                Some(Ok(Chunk::PromptLogprobs(_) | Chunk::Embedding(_))) => continue,
                Some(Ok(Chunk::Token { token, text, finish })) => {
                    completion_tokens += 1;
                    chunk(i, &text, std::slice::from_ref(&token), finish.map(finish_name))
                }
                Some(Ok(Chunk::End(finish))) => chunk(i, "", &[], Some(finish_name(finish))),
                Some(Err(e)) => {
                    failed = true;
                    Some(json!({"error": {"message": e.to_string(), "type": "server_error"}}))
                }
            };
            let Some(payload) = payload else { continue };
            if tx.send(Ok(Event::default().data(payload.to_string()))).await.is_err() {
                return;
            }
            if failed {
                break;
            }
        }
        let cached = cached.load(std::sync::atomic::Ordering::Relaxed).min(prompt_tokens);
        if !failed {
            account.record(prompt_tokens, cached, completion_tokens);
        }
        if let Some(usage_chunk) = usage_chunk.filter(|_| !failed) {
            let _ = tx.send(Ok(Event::default().data(usage_chunk(usage(prompt_tokens, completion_tokens, cached)).to_string()))).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// With `stream_options.include_usage`, the usage chunk: the stream's fields, no choices.
fn usage_chunk(s: &Sampling, head: Value) -> Option<impl FnOnce(Value) -> Value + Send + 'static> {
    let wanted = s.stream_options.as_ref().is_some_and(|o| o.include_usage);
    wanted.then_some(move |usage: Value| {
        let mut last = head;
        last["choices"] = json!([]);
        last["usage"] = usage;
        last
    })
}

pub(super) async fn completions(
    State(Api { frontend, timeout }): State<Api>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let account = Account::new(&frontend, caller);
    let Json(mut req) = body?;
    let raw = completion_request(&frontend.served, &mut req)?;
    let choices = start_choices(&frontend, &req.sampling, raw, timeout)?;
    let (id, model, created) = (format!("cmpl-{}", choices[0].request_id), frontend.served.name.clone(), now());
    let as_ids = req.return_tokens_as_token_ids;
    let want_logprobs = req.logprobs.is_some();
    if req.sampling.stream {
        let head = json!({"id": id, "object": "text_completion", "created": created, "model": model});
        let last = usage_chunk(&req.sampling, head.clone());
        let with_usage = last.is_some();
        let served = frontend.served.clone();
        // Each chunk's token starts where the text streamed before it (in its choice) ends.
        let mut streamed = vec![0; choices.len()];
        let chunk = move |i: usize, text: &str, tokens: &[TokenLogprobs], finish: Option<&str>| {
            let at = streamed[i];
            streamed[i] += text.chars().count();
            let lp = want_logprobs.then(|| completion_logprobs(&served.tokenizer, None, tokens, &vec![at; tokens.len()], as_ids));
            let mut c = head.clone();
            c["choices"] = json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]);
            if with_usage {
                c["usage"] = Value::Null;
            }
            Some(c)
        };
        return Ok(stream(choices, account, chunk, last).into_response());
    }
    let collected = collect_all(choices).await?;
    let tok = &frontend.served.tokenizer;
    let mut out = Vec::with_capacity(collected.len());
    for (i, c) in collected.iter().enumerate() {
        let prompt_text = req.echo.then(|| tok.decode(&c.prompt, true).unwrap_or_default());
        let echoed_chars = prompt_text.as_deref().map(|p| p.chars().count());
        let text = prompt_text.unwrap_or_default() + &c.text;
        let echoed = req.echo.then(|| (c.prompt[0], &c.prompt_logprobs[..]));
        let lp = match want_logprobs {
            true => {
                let ids: Vec<u32> = c.tokens.iter().map(|t| t.token).collect();
                let offsets = completion_offsets(tok, &c.prompt, echoed_chars, &ids, &text)?;
                Some(completion_logprobs(tok, echoed, &c.tokens, &offsets, as_ids))
            }
            false => None,
        };
        out.push(json!({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish}));
    }
    let completion_tokens = collected.iter().map(|c| c.tokens.len()).sum();
    account.record(collected[0].prompt.len(), cached_of(&collected), completion_tokens);
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model, "choices": out,
        "usage": usage(collected[0].prompt.len(), completion_tokens, cached_of(&collected)),
    }))
    .into_response())
}

/// A `/v1/completions` request as its handler reads it before any replica is asked: the
/// HTTP-only checks, its prompt (`req.prompt` taken; a fill-in-the-middle one tokenized), and
/// the request its choices start from.
pub(super) fn completion_request(served: &Served, req: &mut CompletionRequest) -> Result<RawRequest, ApiError> {
    check_sampling(served, &req.sampling)?;
    let prompt = match (req.prompt.take(), &req.suffix) {
        (Some(PromptField::Text(t)), Some(suffix)) => PromptInput::TokenIds(served.fim_prompt(&t, suffix)?),
        (_, Some(_)) => return Err(RequestError::Shape { field: "suffix", expected: "given with a text `prompt`" }.into()),
        (prompt, None) => match prompt {
            None => return Err(RequestError::Required("prompt").into()),
            Some(PromptField::Text(t)) => PromptInput::Text(t),
            Some(PromptField::Ids(ids)) => PromptInput::TokenIds(ids),
            Some(PromptField::Texts(mut v)) if v.len() == 1 => PromptInput::Text(v.remove(0)),
            Some(PromptField::IdLists(mut v)) if v.len() == 1 => PromptInput::TokenIds(v.remove(0)),
            Some(_) => return Err(RequestError::Shape { field: "prompt", expected: "one prompt (a string or a list of token ids)" }.into()),
        },
    };
    if req.echo && req.suffix.is_some() {
        return Err(RequestError::Combination { field: "echo", with: "suffix" }.into());
    }
    if req.echo && req.sampling.stream {
        return Err(RequestError::Combination { field: "echo", with: "stream" }.into());
    }
    // Echo with logprobs scores the prompt too (as evaluation harnesses ask); with
    // `max_tokens: 0` it is all that runs.
    let score_only = req.echo && req.sampling.max_tokens == Some(0);
    let prompt_logprobs = if req.echo { req.logprobs.or(score_only.then_some(0)) } else { None };
    Ok(raw(&req.sampling, prompt, req.sampling.max_tokens, req.logprobs.filter(|_| !score_only), prompt_logprobs)?)
}

pub(super) async fn chat_completions(
    State(Api { frontend, timeout }): State<Api>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(mut req) = body?;
    let (raw, calls_token) = chat_request(&frontend.served, &mut req)?;
    let account = Account::new(&frontend, caller);
    chat_reply(Api { frontend, timeout }, account, &req.sampling, raw, calls_token).await
}

/// A `/v1/chat/completions` request as its handler reads it before any replica is asked: the
/// HTTP-only checks, the conversation (with its tools) rendered and tokenized, and the request
/// its choices start from, with the token the model's tool calls start with.
pub(super) fn chat_request(served: &Served, req: &mut ChatRequest) -> Result<(RawRequest, Option<u32>), ApiError> {
    check_sampling(served, &req.sampling)?;
    if req.messages.is_empty() {
        return Err(RequestError::Empty("messages").into());
    }
    if req.safe_prompt {
        req.messages = with_guardrail(std::mem::take(&mut req.messages));
    }
    let choice = ToolChoice::parse(req.tool_choice.as_ref())?;
    let uses_tools = !req.tools.is_empty() || req.messages.iter().any(|m| !m.tool_calls.is_empty() || m.role == "tool");
    let (ids, calls) = match (uses_tools, served.tool_tokens) {
        (false, _) => {
            if choice != ToolChoice::Auto && choice != ToolChoice::None {
                return Err(RequestError::Combination { field: "tool_choice", with: "no `tools`" }.into());
            }
            (served.chat_prompt(&req.messages)?, None)
        }
        (true, None) => return Err(RequestError::NoTools.into()),
        (true, Some(t)) => {
            tools::check_tools(&req.tools)?;
            let ids = tools::encode(&t, &served.tokenizer, &req.messages, &req.tools)?;
            let parallel = req.parallel_tool_calls.unwrap_or(true);
            let grammar = if req.tools.is_empty() { None } else { tools::grammar(&t, &req.tools, &choice, parallel)? };
            (ids, Some(ToolCalls { token: t.calls, grammar }))
        }
    };
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    reply_request(&req.sampling, ids, max_tokens, logprobs, calls)
}

/// A chat request's tools: the token the model's calls start with, and the grammar of its
/// answer under `tool_choice`.
struct ToolCalls {
    token: u32,
    grammar: Option<Constraint>,
}

/// `/v1/fim/completions`: Mistral's fill-in-the-middle (Codestral's API), answered as a chat
/// completion is.
#[derive(Debug, Deserialize)]
pub(super) struct FimRequest {
    prompt: String,
    suffix: Option<String>,
    #[serde(flatten)]
    sampling: Sampling,
}

pub(super) async fn fim_completions(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<FimRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let raw = fim_request(&api.frontend.served, &req)?;
    let account = Account::new(&api.frontend, caller);
    chat_reply(api, account, &req.sampling, raw, None).await
}

/// A `/v1/fim/completions` request as its handler reads it before any replica is asked: the
/// HTTP-only checks, its prompt tokenized, and the request its choices start from.
pub(super) fn fim_request(served: &Served, req: &FimRequest) -> Result<RawRequest, ApiError> {
    check_sampling(served, &req.sampling)?;
    let ids = served.fim_prompt(&req.prompt, req.suffix.as_deref().unwrap_or_default())?;
    Ok(reply_request(&req.sampling, ids, req.sampling.max_tokens, None, None)?.0)
}

/// The request a chat completion's choices start from, for the prompt `ids`; with `calls`, its
/// answer held to their grammar (refused with another output constraint), and the token the
/// calls start with.
fn reply_request(
    sampling: &Sampling,
    ids: Vec<u32>,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
    calls: Option<ToolCalls>,
) -> Result<(RawRequest, Option<u32>), ApiError> {
    let mut raw = raw(sampling, PromptInput::TokenIds(ids), max_tokens, logprobs, None)?;
    let calls_token = calls.as_ref().map(|c| c.token);
    if let Some(grammar) = calls.and_then(|c| c.grammar) {
        if raw.constraint.is_some() {
            return Err(RequestError::Combination { field: "response_format", with: "tools" }.into());
        }
        raw.constraint = Some(("tool_choice", grammar));
    }
    Ok((raw, calls_token))
}

/// A chat completion's answer (JSON or SSE) to the request `raw` ([`reply_request`]); with
/// `calls_token`, an answer that starts with it is a list of tool calls (`tool_calls`, finish
/// reason `tool_calls`), streamed once whole.
async fn chat_reply(
    Api { frontend, timeout }: Api,
    account: Account,
    sampling: &Sampling,
    raw: RawRequest,
    calls_token: Option<u32>,
) -> Result<Response, ApiError> {
    let want_logprobs = raw.logprobs.is_some();
    let choices = start_choices(&frontend, sampling, raw, timeout)?;
    let (id, model, created) = (format!("chatcmpl-{}", choices[0].request_id), frontend.served.name.clone(), now());
    let served = frontend.served.clone();
    let chat_logprobs = move |tokens: &[TokenLogprobs]| {
        let tok = &served.tokenizer;
        json!({"content": tokens.iter().map(|t| json!({
            "token": token_name(tok, t.token, false), "logprob": t.logprob,
            "top_logprobs": t.top.iter().map(|&(id, lp)| json!({"token": token_name(tok, id, false), "logprob": lp})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()})
    };
    if sampling.stream {
        let head = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model});
        let last = usage_chunk(sampling, head.clone());
        let with_usage = last.is_some();
        let mut first = vec![true; choices.len()];
        // Per choice, the text of the tool calls it is writing (held back until they end).
        let mut writing: Vec<Option<String>> = vec![None; choices.len()];
        let mut call_logprobs: Vec<Vec<TokenLogprobs>> = vec![Vec::new(); choices.len()];
        let chunk = move |i: usize, text: &str, tokens: &[TokenLogprobs], finish: Option<&str>| {
            let starts_calls = first[i] && calls_token.is_some_and(|t| tokens.first().is_some_and(|tl| tl.token == t));
            let mut delta = json!({"content": text});
            if starts_calls {
                writing[i] = Some(String::new());
            }
            let mut lps = tokens.to_vec();
            let mut finish = finish.map(str::to_owned);
            if let Some(buffer) = writing[i].as_mut() {
                buffer.push_str(text);
                call_logprobs[i].extend_from_slice(tokens);
                finish.as_ref()?;
                let buffer = writing[i].take().unwrap_or_default();
                lps = std::mem::take(&mut call_logprobs[i]);
                delta = match tools::parse_calls(&buffer) {
                    Some(calls) => {
                        finish = finish.map(|f| if f == "stop" { "tool_calls".to_owned() } else { f });
                        json!({"content": null, "tool_calls": calls})
                    }
                    None => json!({"content": buffer}),
                };
            }
            if std::mem::take(&mut first[i]) {
                delta["role"] = json!("assistant");
            }
            let mut c = head.clone();
            c["choices"] = json!([{"index": i, "delta": delta, "logprobs": want_logprobs.then(|| chat_logprobs(&lps)), "finish_reason": finish}]);
            if with_usage {
                c["usage"] = Value::Null;
            }
            Some(c)
        };
        return Ok(stream(choices, account, chunk, last).into_response());
    }
    let collected = collect_all(choices).await?;
    let out: Vec<Value> = collected
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let called = calls_token.filter(|&t| c.tokens.first().is_some_and(|tl| tl.token == t)).and_then(|_| tools::parse_calls(&c.text));
            let (message, finish) = match called {
                Some(calls) => (json!({"role": "assistant", "content": null, "tool_calls": calls}), if c.finish == "stop" { "tool_calls" } else { c.finish }),
                None => (json!({"role": "assistant", "content": c.text}), c.finish),
            };
            json!({"index": i, "message": message, "logprobs": want_logprobs.then(|| chat_logprobs(&c.tokens)), "finish_reason": finish})
        })
        .collect();
    let completion_tokens = collected.iter().map(|c| c.tokens.len()).sum();
    account.record(collected[0].prompt.len(), cached_of(&collected), completion_tokens);
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model, "choices": out,
        "usage": usage(collected[0].prompt.len(), completion_tokens, cached_of(&collected)),
    }))
    .into_response())
}
