//! The OpenAI-compatible HTTP API: `/v1/completions`, `/v1/chat/completions` (JSON or SSE),
//! `/v1/models`, `/health`, `/metrics` (Prometheus). Requests become [`RawRequest`]s and go through the same validation
//! and frontend as gRPC; errors come back as OpenAI-style JSON with HTTP 400 / 429 / 503.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cluster::{TokenLogprobs, Tokenizer};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::chat::Message;
use crate::frontend::{Chunk, Frontend, FrontendError, Generation};
use crate::validate::{PromptInput, RawRequest, RequestError};
use cluster::scheduler::Finish;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// The routes, over a frontend; every request must finish within `timeout`.
pub fn router(frontend: Frontend, timeout: std::time::Duration) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Api { frontend, timeout })
}

#[derive(Clone)]
struct Api {
    frontend: Frontend,
    timeout: std::time::Duration,
}

/// An HTTP error as OpenAI clients expect it: status, message, and the request field at fault.
pub struct ApiError(StatusCode, String, Option<String>);

impl From<FrontendError> for ApiError {
    fn from(e: FrontendError) -> Self {
        let status = match &e {
            FrontendError::InvalidArgument(e) => return e.clone().into(),
            FrontendError::AlreadyExists(_) => StatusCode::CONFLICT,
            FrontendError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            FrontendError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            FrontendError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            FrontendError::ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string(), None)
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.to_string(), Some(e.field().to_owned()))
    }
}

/// The tokenizer failing on ids the model produced or was given: the server's fault.
impl From<cluster::Error> for ApiError {
    fn from(e: cluster::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let msg = match &r {
            JsonRejection::BytesRejection(_) => format!("the request body must be <= {MAX_BODY_BYTES} bytes"),
            other => format!("invalid JSON body: {}", other.body_text()),
        };
        ApiError(StatusCode::BAD_REQUEST, msg, None)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.0 == StatusCode::BAD_REQUEST { "invalid_request_error" } else { "server_error" };
        let body = json!({"error": {"message": self.1, "type": kind, "param": self.2, "code": self.0.as_u16()}});
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            // Load balancers and clients try again (elsewhere) after a second.
            return (self.0, [(axum::http::header::RETRY_AFTER, "1")], Json(body)).into_response();
        }
        (self.0, Json(body)).into_response()
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

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
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
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
        "presence_penalty" | "frequency_penalty" => v.as_f64() == Some(0.0),
        "repetition_penalty" => v.as_f64() == Some(1.0),
        "best_of" => v.as_u64() == Some(1),
        "safe_prompt" => v.as_bool() == Some(false),
        "logit_bias" | "metadata" => v.as_object().is_some_and(serde_json::Map::is_empty),
        "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
        // Without tools there is nothing to call, whatever the choice.
        "tools" => v.as_array().is_some_and(Vec::is_empty),
        "tool_choice" => matches!(v.as_str(), Some("auto" | "none")),
        "parallel_tool_calls" => v.is_boolean(),
        _ => v.is_null(),
    }
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Option<PromptField>,
    #[serde(default)]
    echo: bool,
    logprobs: Option<u32>,
    #[serde(default)]
    return_tokens_as_token_ids: bool,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    /// Mistral's `safe_prompt`: the guardrail system prompt goes first ([`with_guardrail`]).
    #[serde(default)]
    safe_prompt: bool,
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
        _ => messages.insert(0, Message { role: "system".into(), content: GUARDRAIL.into() }),
    }
    messages
}

/// Checks of the sampling fields that only HTTP has.
fn check_sampling(frontend: &Frontend, s: &Sampling) -> Result<(), ApiError> {
    check_model(frontend, s.model.as_deref())?;
    if s.n.is_some_and(|n| n != 1) {
        return Err(RequestError::Shape { field: "n", expected: "1" }.into());
    }
    if s.top_k.is_some_and(|k| k < -1) {
        return Err(RequestError::Shape { field: "top_k", expected: "-1 (off) or >= 0" }.into());
    }
    if let Some((field, v)) = s.other.iter().find(|(f, v)| !neutral(f, v)) {
        return Err(RequestError::Unsupported { field: field.clone(), got: v.to_string() }.into());
    }
    Ok(())
}

/// The `model` field, where given, must name the served model.
fn check_model(frontend: &Frontend, model: Option<&str>) -> Result<(), ApiError> {
    let served = &frontend.served.name;
    match model.filter(|m| !m.is_empty() && *m != served.as_str()) {
        Some(m) => Err(RequestError::Model { got: m.to_owned(), served: served.clone() }.into()),
        None => Ok(()),
    }
}

/// `/tokenize` (vLLM's shape): a prompt, or chat messages rendered with the chat template.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    /// For `prompt`: add the tokenizer's special tokens (BOS); chat templates write their own.
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

/// `/detokenize` (vLLM's shape).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
    #[serde(default)]
    skip_special_tokens: bool,
}

async fn tokenize(State(Api { frontend, .. }): State<Api>, body: Result<Json<TokenizeRequest>, JsonRejection>) -> Result<Json<Value>, ApiError> {
    let Json(req) = body?;
    check_model(&frontend, req.model.as_deref())?;
    let s = &frontend.served;
    let ids = match (req.prompt, req.messages) {
        (Some(prompt), None) => {
            s.tokenizer.encode(&prompt, req.add_special_tokens).map_err(|e| RequestError::Untokenizable { field: "prompt", reason: e.to_string() })
        }
        (None, Some(messages)) => s.chat_prompt(&messages),
        _ => Err(RequestError::OneOf("prompt", "messages")),
    }?;
    Ok(Json(json!({"count": ids.len(), "max_model_len": s.limits.max_context, "tokens": ids})))
}

async fn detokenize(State(Api { frontend, .. }): State<Api>, body: Result<Json<DetokenizeRequest>, JsonRejection>) -> Result<Json<Value>, ApiError> {
    let Json(req) = body?;
    check_model(&frontend, req.model.as_deref())?;
    let text = frontend.served.detokenize(&req.tokens, req.skip_special_tokens, "tokens")?;
    Ok(Json(json!({"prompt": text})))
}

fn raw(s: &Sampling, prompt: PromptInput, max_tokens: Option<u32>, logprobs: Option<u32>, prompt_logprobs: Option<u32>) -> RawRequest {
    RawRequest {
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
    }
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
    text: String,
    tokens: Vec<TokenLogprobs>,
    finish: &'static str,
    prompt_tokens: usize,
    prompt_logprobs: Vec<TokenLogprobs>,
}

async fn collect(mut g: Generation) -> Result<Collected, ApiError> {
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
        }
    }
    Ok(Collected { text, tokens, finish, prompt_tokens: g.prompt.len(), prompt_logprobs })
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
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

/// Streams a generation as SSE: `chunk(delta_text, tokens, finish)` builds each JSON payload.
fn stream(mut g: Generation, chunk: impl Fn(&str, &[TokenLogprobs], Option<&str>) -> Value + Send + 'static) -> SseStream {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(item) = g.next().await {
            let payload = match item {
                Ok(Chunk::PromptLogprobs(_)) => continue,
                Ok(Chunk::Token { token, text, finish }) => chunk(&text, std::slice::from_ref(&token), finish.map(finish_name)),
                Err(e) => json!({"error": {"message": e.to_string(), "type": "server_error"}}),
            };
            if tx.send(Ok(Event::default().data(payload.to_string()))).await.is_err() {
                return; // client gone: dropping the generation aborts it
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn completions(State(Api { frontend, timeout }): State<Api>, body: Result<Json<CompletionRequest>, JsonRejection>) -> Result<Response, ApiError> {
    let Json(req) = body?;
    check_sampling(&frontend, &req.sampling)?;
    let prompt = match req.prompt {
        None => return Err(RequestError::Required("prompt").into()),
        Some(PromptField::Text(t)) => PromptInput::Text(t),
        Some(PromptField::Ids(ids)) => PromptInput::TokenIds(ids),
        Some(PromptField::Texts(mut v)) if v.len() == 1 => PromptInput::Text(v.remove(0)),
        Some(PromptField::IdLists(mut v)) if v.len() == 1 => PromptInput::TokenIds(v.remove(0)),
        Some(_) => return Err(RequestError::Shape { field: "prompt", expected: "one prompt (a string or a list of token ids)" }.into()),
    };
    if req.echo && req.sampling.stream {
        return Err(RequestError::Combination { field: "echo", with: "stream" }.into());
    }
    // Echo with logprobs scores the prompt too (as evaluation harnesses ask).
    let prompt_logprobs = req.logprobs.filter(|_| req.echo);
    let g = frontend.start(None, raw(&req.sampling, prompt, req.sampling.max_tokens, req.logprobs, prompt_logprobs), timeout)?;
    let (id, model, created) = (format!("cmpl-{}", g.request_id), frontend.served.name.clone(), now());
    let as_ids = req.return_tokens_as_token_ids;
    let want_logprobs = req.logprobs.is_some();
    let tok_frontend = frontend.clone();
    if req.sampling.stream {
        // Each chunk's token starts where the text streamed before it ends.
        let streamed = std::sync::atomic::AtomicUsize::new(0);
        return Ok(stream(g, move |text, tokens, finish| {
            let at = streamed.fetch_add(text.chars().count(), std::sync::atomic::Ordering::Relaxed);
            let lp = want_logprobs.then(|| completion_logprobs(&tok_frontend.served.tokenizer, None, tokens, &vec![at; tokens.len()], as_ids));
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]})
        })
        .into_response());
    }
    let prompt_ids = g.prompt.clone();
    let c = collect(g).await?;
    let tok = &frontend.served.tokenizer;
    let prompt_text = req.echo.then(|| tok.decode(&prompt_ids, true).unwrap_or_default());
    let echoed_chars = prompt_text.as_deref().map(|p| p.chars().count());
    let text = match prompt_text {
        Some(prompt_text) => prompt_text + &c.text,
        None => c.text,
    };
    let echoed = req.echo.then(|| (prompt_ids[0], &c.prompt_logprobs[..]));
    let lp = match want_logprobs {
        true => {
            let ids: Vec<u32> = c.tokens.iter().map(|t| t.token).collect();
            let offsets = completion_offsets(tok, &prompt_ids, echoed_chars, &ids, &text)?;
            Some(completion_logprobs(tok, echoed, &c.tokens, &offsets, as_ids))
        }
        false => None,
    };
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": c.finish}],
        "usage": usage(c.prompt_tokens, c.tokens.len()),
    }))
    .into_response())
}

async fn chat_completions(State(Api { frontend, timeout }): State<Api>, body: Result<Json<ChatRequest>, JsonRejection>) -> Result<Response, ApiError> {
    let Json(mut req) = body?;
    check_sampling(&frontend, &req.sampling)?;
    if req.messages.is_empty() {
        return Err(RequestError::Empty("messages").into());
    }
    if req.safe_prompt {
        req.messages = with_guardrail(std::mem::take(&mut req.messages));
    }
    let ids = frontend.served.chat_prompt(&req.messages)?;
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    let g = frontend.start(None, raw(&req.sampling, PromptInput::TokenIds(ids), max_tokens, logprobs, None), timeout)?;
    let (id, model, created) = (format!("chatcmpl-{}", g.request_id), frontend.served.name.clone(), now());
    let tok_frontend = frontend.clone();
    let chat_logprobs = move |tokens: &[TokenLogprobs]| {
        let tok = &tok_frontend.served.tokenizer;
        json!({"content": tokens.iter().map(|t| json!({
            "token": token_name(tok, t.token, false), "logprob": t.logprob,
            "top_logprobs": t.top.iter().map(|&(id, lp)| json!({"token": token_name(tok, id, false), "logprob": lp})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()})
    };
    let want_logprobs = req.logprobs;
    if req.sampling.stream {
        let first = std::sync::atomic::AtomicBool::new(true);
        return Ok(stream(g, move |text, tokens, finish| {
            let mut delta = json!({"content": text});
            if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                delta["role"] = json!("assistant");
            }
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": want_logprobs.then(|| chat_logprobs(tokens)), "finish_reason": finish}]})
        })
        .into_response());
    }
    let c = collect(g).await?;
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "logprobs": want_logprobs.then(|| chat_logprobs(&c.tokens)), "finish_reason": c.finish}],
        "usage": usage(c.prompt_tokens, c.tokens.len()),
    }))
    .into_response())
}

async fn models(State(Api { frontend, .. }): State<Api>) -> Json<Value> {
    let s = &frontend.served;
    // OpenAI's fields, vLLM's `max_model_len`, and the card Mistral's SDK reads (`type`,
    // `capabilities`, `max_context_length`).
    let capabilities = json!({"completion_chat": true, "completion_fim": false, "function_calling": false, "fine_tuning": false, "vision": false});
    Json(json!({"object": "list", "data": [{
        "id": s.name, "object": "model", "created": now(), "owned_by": "tramontane", "max_model_len": s.limits.max_context,
        "type": "base", "capabilities": capabilities, "max_context_length": s.limits.max_context,
    }]}))
}

async fn metrics(State(Api { frontend, .. }): State<Api>) -> impl IntoResponse {
    let text = frontend.metrics.render(frontend.gauges());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn health(State(Api { frontend, .. }): State<Api>) -> StatusCode {
    if frontend.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}
