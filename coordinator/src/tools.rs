//! Mistral function calling with the v3 instruct tokenizer: the conversation (tools, calls and
//! their results) encoded token for token as mistral-common's `encode_chat_completion` encodes
//! it, a grammar that holds the model's `[TOOL_CALLS]` output to valid calls of the offered
//! tools (`tool_choice`), and that output read back into OpenAI-style `tool_calls`.
//!
//! The v3 prompt: `<s>`, then each message, after mistral-common's normalization (system
//! messages become one system prompt, joined by a blank line, given with the last user
//! message; consecutive messages of one role merge; a conversation that does not start with a
//! user message gets an empty one first):
//! - user: `[AVAILABLE_TOOLS]`tools`[/AVAILABLE_TOOLS]` before the last one (with tools),
//!   then `[INST]`text`[/INST]`;
//! - assistant: its text (trailing spaces cut) or `[TOOL_CALLS]`calls, then `</s>` unless it is
//!   a prefix;
//! - tool: `[TOOL_RESULTS]{"content": …, "call_id": …}[/TOOL_RESULTS]`.
//!
//! JSON is written as Python's `json.dumps(ensure_ascii=False)` writes it, and every text
//! segment is tokenized on its own (so each starts with sentencepiece's `▁`).

use cluster::Tokenizer;
use cluster::constraint::{Constraint, json_layout};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::chat::Message;
use crate::validate::RequestError;

/// A tool the model may call (OpenAI's and Mistral's shape).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type", default = "function")]
    pub kind: String,
    pub function: Function,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Function {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// A JSON schema of the arguments (an object).
    #[serde(default = "any_object")]
    pub parameters: Value,
    /// The arguments always match `parameters` here, strict or not.
    pub strict: Option<bool>,
}

fn function() -> String {
    "function".into()
}

fn any_object() -> Value {
    json!({"type": "object", "properties": {}})
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The model answers in text or calls tools.
    Auto,
    /// Text only.
    None,
    /// At least one call (`any`, or OpenAI's `required`).
    Required,
    /// Calls of this tool only.
    Named(String),
}

impl ToolChoice {
    pub fn parse(v: Option<&Value>) -> Result<Self, RequestError> {
        let bad = || RequestError::Shape {
            field: "tool_choice",
            expected: "\"auto\", \"none\", \"any\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
        };
        match v {
            None | Some(Value::Null) => Ok(ToolChoice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Ok(ToolChoice::Auto),
                "none" => Ok(ToolChoice::None),
                "any" | "required" => Ok(ToolChoice::Required),
                _ => Err(bad()),
            },
            Some(v) => v.pointer("/function/name").and_then(Value::as_str).map(|n| ToolChoice::Named(n.to_owned())).ok_or_else(bad),
        }
    }
}

/// The v3 tokenizer's control tokens.
#[derive(Debug, Clone, Copy)]
pub struct ToolTokens {
    bos: u32,
    eos: u32,
    inst: u32,
    end_inst: u32,
    tools: u32,
    end_tools: u32,
    pub calls: u32,
    results: u32,
    end_results: u32,
}

impl ToolTokens {
    /// `None` for a tokenizer without them (Mistral's v1).
    pub fn of(tok: &Tokenizer) -> Option<Self> {
        let id = |t: &str| tok.token_id(t);
        Some(ToolTokens {
            bos: id("<s>")?,
            eos: id("</s>")?,
            inst: id("[INST]")?,
            end_inst: id("[/INST]")?,
            tools: id("[AVAILABLE_TOOLS]")?,
            end_tools: id("[/AVAILABLE_TOOLS]")?,
            calls: id("[TOOL_CALLS]")?,
            results: id("[TOOL_RESULTS]")?,
            end_results: id("[/TOOL_RESULTS]")?,
        })
    }
}

/// JSON as Python's `json.dumps` writes it: `", "` and `": "`, keys in order, non-ASCII raw.
pub fn py_json(v: &Value) -> String {
    struct Python;
    impl serde_json::ser::Formatter for Python {
        fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Python);
    serde::Serialize::serialize(v, &mut ser).expect("serializing a JSON value");
    String::from_utf8(out).expect("JSON is UTF-8")
}

/// mistral-common's reading of a text that may hold JSON: empty is `{}`, JSON is its value,
/// anything else the text itself.
fn json_or_text(v: &Value) -> Value {
    match v {
        Value::String(s) if s.is_empty() => json!({}),
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| v.clone()),
        other => other.clone(),
    }
}

fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_call_id(s: &str) -> bool {
    s.len() == 9 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn messages_error(msg: String) -> RequestError {
    RequestError::Messages(msg)
}

/// Checks what mistral-common's validator checks of tools and calls.
pub fn check_tools(tools: &[Tool]) -> Result<(), RequestError> {
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return Err(RequestError::Shape { field: "tools", expected: "tools of `type` \"function\"" });
        }
        if !is_name(&t.function.name) {
            return Err(RequestError::Grammar {
                field: "tools",
                reason: format!("tools[{i}].function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {:?}", t.function.name),
            });
        }
        if !t.function.parameters.is_object() {
            return Err(RequestError::Grammar { field: "tools", reason: format!("tools[{i}].function.parameters must be a JSON schema (an object)") });
        }
    }
    Ok(())
}

/// One message after mistral-common's normalization.
enum Turn {
    User(String),
    Assistant { text: String, calls: Vec<Value>, prefix: bool },
    Tool { content: Value, call_id: String },
}

/// mistral-common's normalization: the system prompt, and the other messages with runs of one
/// role merged.
fn normalize(messages: &[Message]) -> Result<(Option<String>, Vec<Turn>), RequestError> {
    let system: Vec<&str> = messages.iter().filter(|m| m.role == "system" && !m.content.is_empty()).map(|m| m.content.as_str()).collect();
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    let mut turns: Vec<Turn> = Vec::new();
    let mut i = 0;
    while i < messages.len() {
        let role = messages[i].role.as_str();
        let run_end = (i..messages.len()).find(|&j| messages[j].role != role).unwrap_or(messages.len());
        let run = &messages[i..run_end];
        let joined = || run.iter().map(|m| m.content.as_str()).filter(|c| !c.is_empty()).collect::<Vec<_>>().join("\n\n");
        match role {
            "system" => {}
            "user" => turns.push(Turn::User(joined())),
            "assistant" => {
                let mut calls = Vec::new();
                for (k, m) in run.iter().enumerate() {
                    if !m.tool_calls.is_empty() && !m.content.is_empty() {
                        return Err(messages_error(format!("`messages[{}]` has both content and tool_calls: give one", i + k)));
                    }
                    for c in &m.tool_calls {
                        if !is_name(&c.function.name) {
                            return Err(messages_error(format!("`messages[{}].tool_calls`: function names must match ^[a-zA-Z0-9_-]{{1,64}}$", i + k)));
                        }
                        let id = c.id.as_deref().ok_or_else(|| messages_error(format!("`messages[{}].tool_calls`: each call needs its `id`", i + k)))?;
                        if !is_call_id(id) {
                            return Err(messages_error(format!("`messages[{}].tool_calls`: ids must be 9 letters or digits, got {id:?}", i + k)));
                        }
                        calls.push(json!({"name": c.function.name, "arguments": json_or_text(&c.function.arguments), "id": id}));
                    }
                }
                turns.push(Turn::Assistant { text: joined(), calls, prefix: run.iter().any(|m| m.prefix) });
            }
            "tool" => {
                for (k, m) in run.iter().enumerate() {
                    let call_id =
                        m.tool_call_id.clone().ok_or_else(|| messages_error(format!("`messages[{}]`: a tool message needs its `tool_call_id`", i + k)))?;
                    turns.push(Turn::Tool { content: json_or_text(&Value::String(m.content.clone())), call_id });
                }
            }
            other => return Err(messages_error(format!("`messages[{i}].role` must be system, user, assistant or tool, got {other:?}"))),
        }
        i = run_end;
    }
    if !matches!(turns.first(), Some(Turn::User(_))) {
        turns.insert(0, Turn::User(String::new()));
    }
    match turns.last() {
        Some(Turn::User(_) | Turn::Tool { .. }) | Some(Turn::Assistant { prefix: true, .. }) => {}
        _ => return Err(messages_error("`messages` must end with a user or tool message, or an assistant prefix".into())),
    }
    if let Some(i) = messages.iter().position(|m| m.prefix)
        && (i + 1 != messages.len() || messages[i].role != "assistant")
    {
        return Err(messages_error(format!("`messages[{i}].prefix` may be true only on the last message, an assistant's")));
    }
    Ok((system, turns))
}

/// The prompt of a conversation with tools (or with tool calls in its history).
pub fn encode(t: &ToolTokens, tok: &Tokenizer, messages: &[Message], tools: &[Tool]) -> Result<Vec<u32>, RequestError> {
    let enc = |text: &str| -> Result<Vec<u32>, RequestError> {
        if text.is_empty() { Ok(Vec::new()) } else { tok.encode(text, false).map_err(RequestError::untokenizable("messages")) }
    };
    let (system, turns) = normalize(messages)?;
    let last_user = turns.iter().rposition(|m| matches!(m, Turn::User(_))).expect("normalize starts with a user turn");
    let mut ids = vec![t.bos];
    for (i, turn) in turns.iter().enumerate() {
        match turn {
            Turn::User(text) => {
                if i == last_user && !tools.is_empty() {
                    let listed: Vec<Value> = tools
                        .iter()
                        .map(|tool| {
                            let f = &tool.function;
                            json!({"type": tool.kind, "function": {"name": f.name, "description": f.description, "parameters": f.parameters}})
                        })
                        .collect();
                    ids.push(t.tools);
                    ids.extend(enc(&py_json(&Value::Array(listed)))?);
                    ids.push(t.end_tools);
                }
                let text = match &system {
                    Some(s) if i == last_user => format!("{s}\n\n{text}"),
                    _ => text.clone(),
                };
                ids.push(t.inst);
                ids.extend(enc(&text)?);
                ids.push(t.end_inst);
            }
            Turn::Assistant { text, calls, prefix } => {
                if !calls.is_empty() {
                    ids.push(t.calls);
                    ids.extend(enc(&py_json(&Value::Array(calls.clone())))?);
                } else if !text.is_empty() {
                    ids.extend(enc(text.trim_end_matches(' '))?);
                } else {
                    return Err(messages_error("an assistant message needs content or tool_calls".into()));
                }
                if !prefix {
                    ids.push(t.eos);
                }
            }
            Turn::Tool { content, call_id } => {
                ids.push(t.results);
                ids.extend(enc(&py_json(&json!({"content": content, "call_id": call_id})))?);
                ids.push(t.end_results);
            }
        }
    }
    Ok(ids)
}

/// A Lark string literal of `s`.
fn lit(s: &str) -> String {
    serde_json::to_string(s).expect("a string")
}

/// The grammar of the model's answer under `choice` (`None`: unconstrained). A call is
/// `[TOOL_CALLS]` and a JSON list of `{"name": …, "arguments": …}` (an `"id"` optional), as
/// the v3 models write them; its arguments match the tool's `parameters`.
pub fn grammar(t: &ToolTokens, tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Result<Option<Constraint>, RequestError> {
    const TEXT: &str = "text: /(.|\\n)+/";
    let offered: Vec<&Tool> = match choice {
        ToolChoice::None => return Ok(Some(Constraint::Lark(format!("start: text\n{TEXT}\n")))),
        ToolChoice::Named(name) => {
            let named: Vec<&Tool> = tools.iter().filter(|tool| &tool.function.name == name).collect();
            if named.is_empty() {
                return Err(RequestError::Grammar { field: "tool_choice", reason: format!("no tool named {name:?} is in `tools`") });
            }
            named
        }
        ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
    };
    let mut rules = Vec::new();
    let mut names = Vec::new();
    for (i, tool) in offered.iter().enumerate() {
        let head = format!("{{\"name\": {}, \"arguments\": ", lit(&tool.function.name));
        let schema = json_layout(tool.function.parameters.clone());
        rules.push(format!("call_{i}: {} %json {} id? \"}}\"", lit(&head), schema));
        names.push(format!("call_{i}"));
    }
    let calls = if parallel { "call (\", \" call)*" } else { "call" };
    let start = match choice {
        ToolChoice::Auto => "start: text | calls",
        _ => "start: calls",
    };
    let grammar = format!(
        "{start}\ncalls: <[{}]> \" \"? \"[\" {calls} \"]\"\ncall: {}\n{}\nid: \", \\\"id\\\": \\\"\" /[a-zA-Z0-9]{{9}}/ \"\\\"\"\n{TEXT}\n",
        t.calls,
        names.join(" | "),
        rules.join("\n"),
    );
    Ok(Some(Constraint::Lark(grammar)))
}

/// Nine random letters and digits: a call id where the model wrote none.
pub fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let state = std::collections::hash_map::RandomState::new();
    (0..9u8)
        .map(|i| {
            let mut h = state.build_hasher();
            h.write_u8(i);
            ALPHABET[(h.finish() % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

/// The calls in the text the model wrote after `[TOOL_CALLS]`, as OpenAI's `tool_calls`
/// (`arguments` as JSON text); `None` if it is not a complete list of calls (cut by
/// `max_tokens`).
pub fn parse_calls(text: &str) -> Option<Vec<Value>> {
    let list: Vec<Value> = serde_json::from_str(text.trim_start().trim_start_matches("[TOOL_CALLS]").trim()).ok()?;
    list.iter()
        .enumerate()
        .map(|(index, c)| {
            let name = c.get("name")?.as_str()?;
            let arguments = c.get("arguments").cloned().unwrap_or_else(|| json!({}));
            let arguments = if let Value::String(s) = arguments { s } else { arguments.to_string() };
            let id = c.get("id").and_then(Value::as_str).map_or_else(random_id, str::to_owned);
            Some(json!({"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral-v3-tiny/tokenizer.json")).unwrap()
    }

    /// Every request of tests/fixtures/tool_prompts.json (mistral-common's encodings, from
    /// generate_tool_prompts.py) encodes to the same ids.
    #[test]
    fn prompts_are_token_identical_to_mistral_common() {
        let tok = tokenizer();
        let t = ToolTokens::of(&tok).expect("v3 tool tokens");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tool_prompts.json");
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 8);
        for (i, case) in cases.iter().enumerate() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let tools: Vec<Tool> = serde_json::from_value(case.get("tools").cloned().unwrap_or(json!([]))).unwrap();
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let got = encode(&t, &tok, &messages, &tools).unwrap();
            assert_eq!(got, want, "case {i}:\n got {}\nwant {}", tok.decode(&got, false).unwrap(), tok.decode(&want, false).unwrap());
        }
    }

    #[test]
    fn python_json_and_calls_read_back() {
        assert_eq!(py_json(&json!({"a": [1, 2.5, "é"], "b": {}})), r#"{"a": [1, 2.5, "é"], "b": {}}"#);
        let calls = parse_calls(r#" [{"name": "wx", "arguments": {"city": "Paris"}, "id": "abc123XYZ"}, {"name": "now", "arguments": {}}]"#).unwrap();
        assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(calls[0]["id"], "abc123XYZ");
        assert!(is_call_id(calls[1]["id"].as_str().unwrap()));
        assert!(parse_calls(r#" [{"name": "wx", "argum"#).is_none());
    }
}
