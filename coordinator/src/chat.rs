//! Chat prompts: the checkpoint's own Jinja chat template (`chat_template` in
//! `tokenizer_config.json`, rendered with minijinja as transformers renders it), or Mistral's
//! instruct format when the checkpoint ships none.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, context};

/// One message of a conversation (as the HTTP API receives it, too).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    /// `null` (an assistant's turn that only calls tools) reads as empty.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    /// Mistral's assistant prefix: the last message, an assistant's, whose text the reply
    /// continues (the prompt ends with it, not with the end of the turn).
    #[serde(default)]
    pub prefix: bool,
    /// An assistant's calls of the request's tools.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool message's answer to this call.
    pub tool_call_id: Option<String>,
    /// A tool message's function name (OpenAI's; Mistral's v3 prompt does not carry it).
    pub name: Option<String>,
}

/// A call of a tool, in a conversation's history (OpenAI's and Mistral's shape).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCall,
    /// Streaming clients echo the delta's index back.
    pub index: Option<u32>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text (OpenAI) or a JSON object (Mistral's SDK may send either).
    pub arguments: serde_json::Value,
}

/// A field given as `null` reads as its empty value.
pub(crate) fn null_as_empty<'de, D: serde::Deserializer<'de>, T: Default + serde::Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(<Option<T> as serde::Deserialize>::deserialize(d)?.unwrap_or_default())
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into(), prefix: false, tool_calls: Vec::new(), tool_call_id: None, name: None }
    }
}

pub enum ChatTemplate {
    Jinja {
        env: Box<Environment<'static>>,
        bos_token: String,
        eos_token: String,
    },
    /// `<s>[INST] user [/INST] assistant</s>[INST] user [/INST]`.
    MistralInstruct,
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_owned(),
        None => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the checkpoint in `dir`, or the Mistral instruct format.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(ChatTemplate::MistralInstruct) };
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned))
                .ok_or_else(|| format!("{}: no \"default\" chat template", path.display()))?,
            _ => return Ok(ChatTemplate::MistralInstruct),
        };
        Self::from_jinja(template, token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token")))
            .map_err(|e| format!("{}: chat_template: {e}", path.display()))
    }

    pub fn from_jinja(template: String, bos_token: String, eos_token: String) -> Result<Self, String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> { Err(Error::new(ErrorKind::InvalidOperation, msg)) });
        env.add_template_owned("chat", template).map_err(|e| e.to_string())?;
        Ok(ChatTemplate::Jinja { env: Box::new(env), bos_token, eos_token })
    }

    /// The prompt text for `messages`, ending where the assistant's reply begins (after the
    /// text of an assistant prefix, if the last message is one). Errors are messages for the
    /// client (HTTP 400).
    pub fn render(&self, messages: &[Message]) -> Result<String, String> {
        if let Some(i) = messages.iter().position(|m| !m.tool_calls.is_empty() || m.role == "tool") {
            return Err(format!("`messages[{i}]`: tool calls and results need a tokenizer with Mistral's tool tokens ([TOOL_CALLS]); this model's has none"));
        }
        if let Some(i) = messages.iter().position(|m| m.prefix)
            && (i + 1 != messages.len() || messages[i].role != "assistant")
        {
            return Err(format!("`messages[{i}].prefix` may be true only on the last message, an assistant's"));
        }
        let prefix = messages.last().filter(|m| m.prefix).map(|m| m.content.as_str());
        match self {
            ChatTemplate::Jinja { env, bos_token, eos_token } => {
                let t = env.get_template("chat").map_err(|e| e.to_string())?;
                let messages: Vec<minijinja::Value> = messages
                    .iter()
                    .map(|m| {
                        let map: std::collections::BTreeMap<String, String> =
                            [("role".to_owned(), m.role.clone()), ("content".to_owned(), m.content.clone())].into();
                        minijinja::Value::from(map)
                    })
                    .collect();
                let text = t
                    .render(context! { messages, bos_token, eos_token, add_generation_prompt => prefix.is_none() })
                    .map_err(|e| format!("`messages` do not fit the model's chat template: {}", e.detail().unwrap_or(&e.to_string())))?;
                match prefix {
                    None => Ok(text),
                    // The conversation rendered whole, cut where the prefix's text ends (as
                    // transformers' `continue_final_message` does).
                    Some(p) => match text.rfind(p) {
                        Some(at) => Ok(text[..at + p.len()].to_owned()),
                        None => Err("the model's chat template does not write the assistant prefix's text as given".into()),
                    },
                }
            }
            ChatTemplate::MistralInstruct => mistral_instruct(messages),
        }
    }
}

/// Mistral's instruct format; a system message is prepended to the first user message.
fn mistral_instruct(messages: &[Message]) -> Result<String, String> {
    let mut system = None;
    let mut out = String::from("<s>");
    for (i, m) in messages.iter().enumerate() {
        match m.role.as_str() {
            "system" if i == 0 => system = Some(m.content.clone()),
            "user" => match system.take() {
                Some(s) => out.push_str(&format!("[INST] {s}\n\n{} [/INST]", m.content)),
                None => out.push_str(&format!("[INST] {} [/INST]", m.content)),
            },
            "assistant" if m.prefix => out.push_str(&format!(" {}", m.content)),
            "assistant" => out.push_str(&format!(" {}</s>", m.content)),
            other => return Err(format!("`messages[{i}].role` must be system (first only), user or assistant, got {other:?}")),
        }
    }
    if messages.last().is_none_or(|m| m.role != "user" && !m.prefix) {
        return Err("`messages` must end with a user message or an assistant prefix".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(v: &[(&str, &str)]) -> Vec<Message> {
        v.iter().map(|(r, c)| Message::new(r, *c)).collect()
    }

    #[test]
    fn the_mistral_instruct_format() {
        let m = msgs(&[("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]);
        assert_eq!(ChatTemplate::MistralInstruct.render(&m).unwrap(), "<s>[INST] Be brief.\n\nHi [/INST] Hello</s>[INST] Bye [/INST]");
        assert!(ChatTemplate::MistralInstruct.render(&msgs(&[("user", "a"), ("assistant", "b")])).is_err());
        assert!(ChatTemplate::MistralInstruct.render(&msgs(&[("tool", "a")])).unwrap_err().contains("[TOOL_CALLS]"));
        assert!(ChatTemplate::MistralInstruct.render(&msgs(&[("critic", "a")])).unwrap_err().contains("role"));
    }

    #[test]
    fn an_assistant_prefix_ends_the_prompt() {
        let mut m = msgs(&[("user", "Hi"), ("assistant", "Sure, here")]);
        m[1].prefix = true;
        assert_eq!(ChatTemplate::MistralInstruct.render(&m).unwrap(), "<s>[INST] Hi [/INST] Sure, here");
        let template = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}\
            {% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}";
        let t = ChatTemplate::from_jinja(template.into(), "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(t.render(&m).unwrap(), "<s>[INST] Hi [/INST] Sure, here");
        // Only the last message, an assistant's, may be a prefix.
        let mut early = msgs(&[("user", "Hi"), ("assistant", "A"), ("user", "B")]);
        early[1].prefix = true;
        assert!(t.render(&early).unwrap_err().contains("messages[1].prefix"));
        let mut user = msgs(&[("user", "Hi")]);
        user[0].prefix = true;
        assert!(ChatTemplate::MistralInstruct.render(&user).is_err());
    }

    #[test]
    fn a_checkpoint_template_renders_with_python_methods_and_raise_exception() {
        // The shape of Mistral's published templates.
        let template = "{{ bos_token }}{% for message in messages %}\
            {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
            {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
            {% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}\
            {% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}";
        let t = ChatTemplate::from_jinja(template.into(), "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(t.render(&msgs(&[("user", " Hi "), ("assistant", "Yo"), ("user", "Bye")])).unwrap(), "<s>[INST] Hi [/INST] Yo</s>[INST] Bye [/INST]");
        let err = t.render(&msgs(&[("user", "a"), ("user", "b")])).unwrap_err();
        assert!(err.contains("alternate"), "{err}");
    }

    #[test]
    fn tokenizer_config_is_read_or_the_fallback_used() {
        let dir = std::env::temp_dir().join(format!("chat-template-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(ChatTemplate::load(&dir).unwrap(), ChatTemplate::MistralInstruct));
        let cfg = serde_json::json!({"chat_template": "{{ bos_token }}{{ messages[-1]['content'] }}", "bos_token": {"content": "<s>"}, "eos_token": "</s>"});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::load(&dir).unwrap();
        assert_eq!(t.render(&msgs(&[("user", "x")])).unwrap(), "<s>x");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
