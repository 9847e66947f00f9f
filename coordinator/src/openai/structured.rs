//! Structured output over HTTP: OpenAI's and Mistral's `response_format` (`text`,
//! `json_object`, `json_schema`) and vLLM's `structured_outputs` (`json`, `regex`, `choice`,
//! `grammar`, `json_object`), read into one [`Constraint`].

use cluster::constraint::Constraint;
use serde_json::Value;

use crate::validate::RequestError;

fn shape(field: &'static str, expected: &'static str) -> RequestError {
    RequestError::Shape { field, expected }
}

/// `response_format`: `None` for free text.
pub fn response_format(v: &Value) -> Result<Option<Constraint>, RequestError> {
    const FIELD: &str = "response_format";
    let obj = v.as_object().ok_or(shape(FIELD, "an object with a `type`"))?;
    let only = |allowed: &[&str]| match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(RequestError::Unsupported { field: format!("response_format.{k}"), got: obj[k].to_string() }),
        None => Ok(()),
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => only(&["type"]).map(|()| None),
        Some("json_object") => only(&["type"]).map(|()| Some(Constraint::JsonObject)),
        Some("json_schema") => {
            only(&["type", "json_schema"])?;
            let spec = obj.get("json_schema").and_then(Value::as_object).ok_or(shape("response_format.json_schema", "an object with a `schema`"))?;
            // `strict: false` asks for less than this server gives: the output always matches.
            if let Some(k) = spec.keys().find(|k| !["name", "description", "schema", "strict"].contains(&k.as_str())) {
                return Err(RequestError::Unsupported { field: format!("response_format.json_schema.{k}"), got: spec[k].to_string() });
            }
            match spec.get("schema") {
                Some(schema @ Value::Object(_)) => Ok(Some(Constraint::JsonSchema(schema.clone()))),
                _ => Err(shape("response_format.json_schema.schema", "a JSON schema (an object)")),
            }
        }
        _ => Err(shape("response_format.type", "\"text\", \"json_object\" or \"json_schema\"")),
    }
}

/// vLLM's `structured_outputs`: exactly one of its kinds.
pub fn structured_outputs(v: &Value) -> Result<Constraint, RequestError> {
    const FIELD: &str = "structured_outputs";
    let obj = v.as_object().ok_or(shape(FIELD, "an object with one of `json`, `regex`, `choice`, `grammar`, `json_object`"))?;
    let given: Vec<(&String, &Value)> = obj.iter().filter(|(_, v)| !v.is_null()).collect();
    let [(kind, value)] = given[..] else {
        return Err(shape(FIELD, "an object with exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`"));
    };
    match (kind.as_str(), value) {
        // A schema, or a schema as JSON text.
        ("json", Value::Object(_)) => Ok(Constraint::JsonSchema(value.clone())),
        ("json", Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(schema @ Value::Object(_)) => Ok(Constraint::JsonSchema(schema)),
            _ => Err(shape("structured_outputs.json", "a JSON schema (an object, or its JSON text)")),
        },
        ("json", _) => Err(shape("structured_outputs.json", "a JSON schema (an object, or its JSON text)")),
        ("regex", Value::String(rx)) => Ok(Constraint::Regex(rx.clone())),
        ("regex", _) => Err(shape("structured_outputs.regex", "a string")),
        ("choice", Value::Array(items)) if !items.is_empty() => {
            let choices: Option<Vec<String>> = items.iter().map(|c| c.as_str().map(str::to_owned)).collect();
            choices.map(Constraint::Choice).ok_or(shape("structured_outputs.choice", "a non-empty list of strings"))
        }
        ("choice", _) => Err(shape("structured_outputs.choice", "a non-empty list of strings")),
        ("grammar", Value::String(lark)) => Ok(Constraint::Lark(lark.clone())),
        ("grammar", _) => Err(shape("structured_outputs.grammar", "a grammar in Lark syntax (a string)")),
        ("json_object", Value::Bool(true)) => Ok(Constraint::JsonObject),
        ("json_object", _) => Err(shape("structured_outputs.json_object", "true")),
        (other, v) => Err(RequestError::Unsupported { field: format!("structured_outputs.{other}"), got: v.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_shapes_read_and_bad_ones_name_the_field() {
        assert_eq!(response_format(&json!({"type": "text"})).unwrap(), None);
        assert_eq!(response_format(&json!({"type": "json_object"})).unwrap(), Some(Constraint::JsonObject));
        let schema = json!({"type": "object"});
        let spec = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}});
        assert_eq!(response_format(&spec).unwrap(), Some(Constraint::JsonSchema(schema.clone())));
        assert_eq!(response_format(&json!({"type": "xml"})).unwrap_err().field(), "response_format.type");
        assert_eq!(response_format(&json!({"type": "json_schema", "json_schema": {}})).unwrap_err().field(), "response_format.json_schema.schema");
        assert_eq!(structured_outputs(&json!({"json": schema.to_string()})).unwrap(), Constraint::JsonSchema(schema));
        assert_eq!(structured_outputs(&json!({"choice": ["a", "b"]})).unwrap(), Constraint::Choice(vec!["a".into(), "b".into()]));
        assert_eq!(structured_outputs(&json!({"regex": "a+", "choice": ["a"]})).unwrap_err().field(), "structured_outputs");
        assert_eq!(structured_outputs(&json!({"structural_tag": "x"})).unwrap_err().field(), "structured_outputs.structural_tag");
    }
}
