//! Conversations of any shape (roles from a fixed set or any text, any contents, assistant
//! prefixes, tool calls and results, tools offered) rendered as the coordinator renders them:
//! with Mistral's instruct format (the fixtures' template: they ship no tokenizer_config.json),
//! with Jinja templates of the shape Mistral publishes, with the v3 tokenizer's tool encoding
//! (`coordinator::tools`), and tokenized for both fixture models. Refusals are fine; a panic is
//! a crash. The model's tool-call output parser (`tools::parse_calls`) reads every content.

#![no_main]

use std::sync::OnceLock;

use coordinator::chat::{ChatTemplate, FunctionCall, Message, ToolCall};
use coordinator::tools::{self, Function, Tool, ToolChoice};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[derive(Arbitrary, Debug)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Call {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    /// JSON text, or a text that is not (read as a string).
    arguments: String,
    index: Option<u32>,
}

#[derive(Arbitrary, Debug)]
struct Msg {
    role: Role,
    content: String,
    prefix: bool,
    tool_calls: Vec<Call>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct Offered {
    kind: Option<String>,
    name: String,
    description: String,
    /// A JSON schema's text, or not JSON (then an object with it as its description).
    parameters: String,
    strict: Option<bool>,
}

#[derive(Arbitrary, Debug)]
enum Choice {
    Auto,
    None,
    Required,
    Named(String),
}

#[derive(Arbitrary, Debug)]
struct Conversation {
    messages: Vec<Msg>,
    tools: Vec<Offered>,
    choice: Choice,
    parallel: bool,
}

/// Mistral's published v0.1 template's shape: roles alternate, contents stripped.
const ALTERNATING: &str = "{{ bos_token }}{% for message in messages %}\
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
    {% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}\
    {% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}";

/// The v0.2/v0.3 shape: an optional system message first, given with the first user message.
const SYSTEM_FIRST: &str = "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}\
    {%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}\
    {{- bos_token }}{%- for message in loop_messages %}\
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
    {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}\
    {%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}\
    {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\
    {%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}\
    {%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}\
    {%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\
    {%- endif %}{%- endfor %}";

fn templates() -> &'static [ChatTemplate; 3] {
    static T: OnceLock<[ChatTemplate; 3]> = OnceLock::new();
    T.get_or_init(|| {
        let jinja = |t: &str| ChatTemplate::from_jinja(t.into(), "<s>".into(), "</s>".into()).expect("the template compiles");
        [ChatTemplate::MistralInstruct, jinja(ALTERNATING), jinja(SYSTEM_FIRST)]
    })
}

/// JSON text as its value; anything else as a string.
fn json_or_string(s: String) -> Value {
    serde_json::from_str(&s).unwrap_or(Value::String(s))
}

fn message(m: Msg) -> Message {
    let role = match m.role {
        Role::System => "system".to_owned(),
        Role::User => "user".to_owned(),
        Role::Assistant => "assistant".to_owned(),
        Role::Tool => "tool".to_owned(),
        Role::Other(r) => r,
    };
    let tool_calls = m
        .tool_calls
        .into_iter()
        .map(|c| ToolCall { id: c.id, kind: c.kind, function: FunctionCall { name: c.name, arguments: json_or_string(c.arguments) }, index: c.index })
        .collect();
    Message { role, content: m.content, prefix: m.prefix, tool_calls, tool_call_id: m.tool_call_id, name: m.name }
}

fn tool(t: Offered) -> Tool {
    let parameters = serde_json::from_str(&t.parameters).unwrap_or_else(|_| serde_json::json!({"type": "object", "description": t.parameters}));
    Tool { kind: t.kind.unwrap_or_else(|| "function".into()), function: Function { name: t.name, description: t.description, parameters, strict: t.strict } }
}

fuzz_target!(|c: Conversation| {
    let messages: Vec<Message> = c.messages.into_iter().map(message).collect();
    let offered: Vec<Tool> = c.tools.into_iter().map(tool).collect();
    let choice = match c.choice {
        Choice::Auto => ToolChoice::Auto,
        Choice::None => ToolChoice::None,
        Choice::Required => ToolChoice::Required,
        Choice::Named(n) => ToolChoice::Named(n),
    };
    let prefix = messages.last().filter(|m| m.prefix).map(|m| m.content.clone());
    for t in templates() {
        if let Ok(text) = t.render(&messages) {
            assert!(text.starts_with("<s>"), "a prompt starts with BOS: {text:?}");
            if let Some(p) = &prefix {
                assert!(text.ends_with(p.as_str()), "the prompt ends with the assistant prefix {p:?}: {text:?}");
            }
        }
    }
    for served in tramontane_fuzz::served() {
        let _ = served.chat_prompt(&messages);
        let Some(tokens) = served.tool_tokens else { continue };
        if tools::check_tools(&offered).is_ok() {
            if let Ok(ids) = tools::encode(&tokens, &served.tokenizer, &messages, &offered) {
                assert!(ids.iter().all(|&t| (t as usize) < served.limits.vocab_size));
            }
            let _ = tools::grammar(&tokens, &offered, &choice, c.parallel);
        }
    }
    for m in &messages {
        let _ = tools::parse_calls(&m.content);
    }
});
