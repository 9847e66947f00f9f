//! The OpenAI-compatible HTTP API: `/v1/completions`, `/v1/chat/completions` (JSON or SSE),
//! `/v1/models`, `/health`, `/metrics` (Prometheus). Requests become [`RawRequest`]s and go through the same validation
//! and frontend as gRPC; errors come back as OpenAI-style JSON with HTTP 400 / 429 / 503.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::AuthError;
use crate::chat::Message;
use crate::frontend::{Frontend, FrontendError, Served};
use crate::validate::{PromptInput, RawRequest, RequestError, ValidRequest};

mod embeddings;
mod generate;
mod structured;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// The routes, over a frontend; every request must finish within `timeout`. With API keys,
/// every route but the probes' and `/metrics` needs one ([`authorize`]).
pub fn router(frontend: Frontend, timeout: std::time::Duration) -> Router {
    let api = Api { frontend, timeout };
    let keyed = Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/fim/completions", post(generate::fim_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), authorize));
    Router::new()
        .merge(keyed)
        .route("/health", get(health))
        .route("/livez", get(live))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// The request's caller (`Authorization: Bearer KEY`), admitted under its key's limits where
/// the route generates or embeds; the handlers find it in the request's extensions.
async fn authorize(State(api): State<Api>, mut req: axum::extract::Request, next: axum::middleware::Next) -> Result<Response, ApiError> {
    let auth = &api.frontend.auth;
    let header = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let caller = auth.authenticate(header, false)?;
    if req.method() == axum::http::Method::POST && req.uri().path().starts_with("/v1/") {
        auth.admit(&caller)?;
    }
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

#[derive(Clone)]
struct Api {
    frontend: Frontend,
    timeout: std::time::Duration,
}

/// An HTTP error as OpenAI clients expect it: status, message, and the request field at fault.
pub struct ApiError(StatusCode, String, Option<String>, RetryAfter);

impl ApiError {
    fn internal(message: String) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, message, None, RetryAfter::default())
    }
}

/// Seconds a client should wait before trying again (429 and 503 answers).
#[derive(Default)]
struct RetryAfter(Option<u64>);

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (status, retry) = match &e {
            AuthError::Missing | AuthError::Invalid => (StatusCode::UNAUTHORIZED, None),
            AuthError::NotAdmin(_) => (StatusCode::FORBIDDEN, None),
            AuthError::Limited { retry_after, .. } => (StatusCode::TOO_MANY_REQUESTS, Some(retry_after.as_secs().max(1))),
        };
        ApiError(status, e.to_string(), None, RetryAfter(retry))
    }
}

impl From<FrontendError> for ApiError {
    fn from(e: FrontendError) -> Self {
        let status = match &e {
            FrontendError::InvalidArgument(e) => return e.clone().into(),
            FrontendError::AlreadyExists(_) => StatusCode::CONFLICT,
            FrontendError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            FrontendError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            FrontendError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            FrontendError::ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
            FrontendError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string(), None, RetryAfter::default())
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.to_string(), Some(e.field().to_owned()), RetryAfter::default())
    }
}

/// The tokenizer failing on ids the model produced or was given: the server's fault.
impl From<cluster::Error> for ApiError {
    fn from(e: cluster::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None, RetryAfter::default())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let msg = match &r {
            JsonRejection::BytesRejection(_) => format!("the request body must be <= {MAX_BODY_BYTES} bytes"),
            other => format!("invalid JSON body: {}", other.body_text()),
        };
        ApiError(StatusCode::BAD_REQUEST, msg, None, RetryAfter::default())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.0 {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            _ => "server_error",
        };
        let body = json!({"error": {"message": self.1, "type": kind, "param": self.2, "code": self.0.as_u16()}});
        match (self.0, self.3.0) {
            // A key's limit: when its minute frees a slot.
            (_, Some(secs)) => (self.0, [(axum::http::header::RETRY_AFTER, secs.to_string())], Json(body)).into_response(),
            // Load balancers and clients try again (elsewhere) after a second.
            (StatusCode::SERVICE_UNAVAILABLE, None) => (self.0, [(axum::http::header::RETRY_AFTER, "1".to_owned())], Json(body)).into_response(),
            (StatusCode::UNAUTHORIZED, None) => (self.0, [(axum::http::header::WWW_AUTHENTICATE, "Bearer".to_owned())], Json(body)).into_response(),
            _ => (self.0, Json(body)).into_response(),
        }
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The `model` field, where given, must name the served model.
fn check_model(served: &Served, model: Option<&str>) -> Result<(), ApiError> {
    let served = &served.name;
    match model.filter(|m| !m.is_empty() && *m != served.as_str()) {
        Some(m) => Err(RequestError::Model { got: m.to_owned(), served: served.clone() }.into()),
        None => Ok(()),
    }
}

/// The generating and embedding routes, whose request bodies [`check_body`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    ChatCompletions,
    /// `/v1/fim/completions`.
    FimCompletions,
    /// `/v1/embeddings`.
    Embeddings,
}

/// A request body for `route` read and checked as its handler reads and checks it before
/// any replica is asked: the JSON (axum's `Json`), the checks only HTTP makes, the prompt
/// (rendered with the chat template or the tools' encoding, tokenized), then
/// [`crate::validate::check`] as [`Frontend::start`] runs it (once: a request's choices
/// differ only in their seeds; an embedding request's inputs each, tokenized as
/// [`Frontend::embed`] tokenizes them). No server, replica or API key takes part. For the fuzz
/// targets (tests/fuzz): any bytes must come back as requests or a refusal, never a panic.
pub fn check_body(served: &Served, route: Route, body: &[u8]) -> Result<Vec<ValidRequest>, ApiError> {
    let check = |raw: RawRequest| crate::validate::check(raw, &served.tokenizer, &served.limits, 0).map_err(ApiError::from);
    match route {
        Route::Completions => {
            let Json(mut req) = Json::from_bytes(body)?;
            Ok(vec![check(generate::completion_request(served, &mut req)?)?])
        }
        Route::ChatCompletions => {
            let Json(mut req) = Json::from_bytes(body)?;
            Ok(vec![check(generate::chat_request(served, &mut req)?.0)?])
        }
        Route::FimCompletions => {
            let Json(req) = Json::from_bytes(body)?;
            Ok(vec![check(generate::fim_request(served, &req)?)?])
        }
        Route::Embeddings => {
            let Json(mut req) = Json::from_bytes(body)?;
            let (inputs, _) = embeddings::embedding_inputs(served, &mut req)?;
            let eos = served.limits.eos_token_ids.first().copied();
            inputs
                .into_iter()
                .map(|input| {
                    let prompt = match input {
                        PromptInput::Text(t) if !t.is_empty() => {
                            let mut ids = served.tokenizer.encode(&t, true).map_err(RequestError::untokenizable("input"))?;
                            ids.extend(eos);
                            PromptInput::TokenIds(ids)
                        }
                        other => other,
                    };
                    check(RawRequest { prompt: Some(prompt), embed: Some(served.pooling), ..RawRequest::default() })
                })
                .collect()
        }
    }
}

/// `/tokenize` (vLLM's shape): a prompt (with a `suffix`, the fill-in-the-middle prompt), or
/// chat messages rendered with the chat template.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    /// With `prompt`: the fill-in-the-middle prompt of `/v1/fim/completions`.
    suffix: Option<String>,
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
    check_model(&frontend.served, req.model.as_deref())?;
    let s = &frontend.served;
    if req.suffix.is_some() && req.messages.is_some() {
        return Err(RequestError::Combination { field: "suffix", with: "messages" }.into());
    }
    let ids = match (req.prompt, req.messages) {
        (Some(prompt), None) => match &req.suffix {
            Some(suffix) => s.fim_prompt(&prompt, suffix),
            None => s.tokenizer.encode(&prompt, req.add_special_tokens).map_err(RequestError::untokenizable("prompt")),
        },
        (None, Some(messages)) => s.chat_prompt(&messages),
        _ => Err(RequestError::OneOf("prompt", "messages")),
    }?;
    Ok(Json(json!({"count": ids.len(), "max_model_len": s.limits.max_context, "tokens": ids})))
}

async fn detokenize(State(Api { frontend, .. }): State<Api>, body: Result<Json<DetokenizeRequest>, JsonRejection>) -> Result<Json<Value>, ApiError> {
    let Json(req) = body?;
    check_model(&frontend.served, req.model.as_deref())?;
    let text = frontend.served.detokenize(&req.tokens, req.skip_special_tokens, "tokens")?;
    Ok(Json(json!({"prompt": text})))
}

async fn models(State(Api { frontend, .. }): State<Api>) -> Json<Value> {
    let s = &frontend.served;
    // OpenAI's fields, vLLM's `max_model_len`, and the card Mistral's SDK reads (`type`,
    // `capabilities`, `max_context_length`).
    let capabilities = json!({"completion_chat": s.limits.lm_head, "completion_fim": s.limits.lm_head && s.tokenizer.has_fim(), "function_calling": s.limits.lm_head && s.tool_tokens.is_some(), "fine_tuning": false, "vision": false});
    Json(json!({"object": "list", "data": [{
        "id": s.name, "object": "model", "created": now(), "owned_by": "tramontane", "max_model_len": s.limits.max_context,
        "type": "base", "capabilities": capabilities, "max_context_length": s.limits.max_context,
    }]}))
}

async fn metrics(State(Api { frontend, .. }): State<Api>) -> impl IntoResponse {
    let mut text = frontend.metrics.render(frontend.gauges());
    text.push_str(&crate::metrics::key_usage(&frontend.auth.usage()));
    text.push_str(&crate::metrics::expert_load(&frontend.expert_loads()));
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// Liveness: the process answers (a standby, or a leader still loading, is alive and not
/// ready).
async fn live() -> StatusCode {
    StatusCode::OK
}

async fn health(State(Api { frontend, .. }): State<Api>) -> StatusCode {
    if frontend.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The v3 fixture as the coordinator serves it (as tests/fuzz loads it).
    fn served() -> Served {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral-v3-tiny");
        let config = cluster::ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let tokenizer = cluster::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        Served::load(&dir, &config, tokenizer).unwrap()
    }

    /// The seeds of the fuzz target of request bodies (tests/fuzz/corpus/http_bodies, each
    /// named after its route) are requests the API takes.
    #[test]
    fn the_fuzz_seeds_are_valid_requests() {
        let served = served();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz/corpus/http_bodies");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let route = match name.split(['_', '.']).next().unwrap() {
                "completion" => Route::Completions,
                "chat" => Route::ChatCompletions,
                "fim" => Route::FimCompletions,
                "embeddings" => Route::Embeddings,
                other => panic!("{name}: no route {other:?}"),
            };
            match check_body(&served, route, &std::fs::read(&path).unwrap()) {
                Ok(requests) => assert!(!requests.is_empty(), "{name}"),
                Err(ApiError(status, message, ..)) => panic!("{name}: {status} {message}"),
            }
            seen += 1;
        }
        assert!(seen >= 10, "{seen} seeds in {}", dir.display());
    }

    #[test]
    fn a_body_is_refused_as_its_handler_refuses_it() {
        let served = served();
        let refused = |route, body: &str| match check_body(&served, route, body.as_bytes()) {
            Ok(_) => panic!("{body} was taken"),
            Err(ApiError(status, message, field, _)) => (status, message, field),
        };
        let (status, message, _) = refused(Route::ChatCompletions, "{\"messages\": [");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message.starts_with("invalid JSON body"), "{message}");
        let (_, _, field) = refused(Route::Completions, r#"{"prompt": "hi", "n": 17}"#);
        assert_eq!(field.as_deref(), Some("n"));
        let (_, _, field) = refused(Route::Completions, r#"{"prompt": "hi", "max_tokens": 1000000}"#);
        assert_eq!(field.as_deref(), Some("max_tokens"));
        let (_, _, field) = refused(Route::Embeddings, r#"{"input": []}"#);
        assert_eq!(field.as_deref(), Some("input"));
    }
}
