//! `/v1/embeddings` in OpenAI's and Mistral's shapes: one input or a batch of them (texts or
//! token ids), vectors as floats or base64 (little-endian f32, as OpenAI's clients decode).

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Api, ApiError, check_model};
use crate::frontend::{MAX_EMBED_INPUTS, Served};
use crate::validate::{PromptInput, RequestError};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EmbeddingRequest {
    model: Option<String>,
    /// `inputs` in Mistral's API.
    #[serde(alias = "inputs")]
    input: Input,
    /// `float` (default) or `base64`.
    encoding_format: Option<String>,
    /// OpenAI's `dimensions`, Mistral's `output_dimension`: only the model's own width (its
    /// embeddings are not trained to be truncated).
    #[serde(alias = "output_dimension")]
    dimensions: Option<usize>,
    /// Mistral's `output_dtype`: `float` only.
    output_dtype: Option<String>,
    /// The client's own metadata (OpenAI's `user`).
    #[serde(rename = "user")]
    _user: Option<String>,
    /// Mistral's request metadata: refused unless empty.
    metadata: Option<Value>,
}

pub(super) async fn embeddings(
    State(Api { frontend, timeout }): State<Api>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    body: Result<Json<EmbeddingRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(mut req) = body?;
    let (inputs, base64) = embedding_inputs(&frontend.served, &mut req)?;
    let (vectors, tokens) = frontend.embed(inputs, timeout).await?;
    frontend.auth.record(&caller, tokens, 0, 0);
    let width = vectors.first().map_or(0, Vec::len);
    if req.dimensions.is_some_and(|d| d != width) {
        return Err(RequestError::Dimensions { width }.into());
    }
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = match base64 {
                true => json!(base64::engine::general_purpose::STANDARD.encode(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())),
                false => json!(v),
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "id": format!("embd-{}", super::now()), "object": "list", "model": frontend.served.name, "data": data,
        "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
    })))
}

/// An embedding request as its handler reads it before any replica is asked: the HTTP-only
/// checks, its inputs (`req.input` taken), and whether its vectors go back in base64.
pub(super) fn embedding_inputs(served: &Served, req: &mut EmbeddingRequest) -> Result<(Vec<PromptInput>, bool), ApiError> {
    check_model(served, req.model.as_deref())?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => return Err(RequestError::Shape { field: "encoding_format", expected: "\"float\" or \"base64\"" }.into()),
    };
    if req.output_dtype.as_deref().is_some_and(|d| d != "float") {
        return Err(RequestError::Shape { field: "output_dtype", expected: "\"float\"" }.into());
    }
    if let Some(m) = req.metadata.as_ref().filter(|m| !m.is_null() && m.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(RequestError::Unsupported { field: "metadata".into(), got: m.to_string() }.into());
    }
    let inputs: Vec<PromptInput> = match std::mem::replace(&mut req.input, Input::Texts(Vec::new())) {
        Input::Text(t) => vec![PromptInput::Text(t)],
        Input::Texts(v) => v.into_iter().map(PromptInput::Text).collect(),
        Input::Ids(ids) => vec![PromptInput::TokenIds(ids)],
        Input::IdLists(v) => v.into_iter().map(PromptInput::TokenIds).collect(),
    };
    if inputs.is_empty() || inputs.len() > MAX_EMBED_INPUTS {
        return Err(RequestError::Shape { field: "input", expected: "1 to 256 texts or token-id lists" }.into());
    }
    Ok((inputs, base64))
}
