//! Constrained decoding survives a move: streams held to a JSON schema, a regex, a Lark
//! grammar and a tool call's grammar run on two single-worker replicas of the v3 Mixtral fixture; one worker is killed
//! (kill -9) while they run, its sequences move to the other replica with the tokens they
//! generated, the driver there rebuilds each grammar's state from those tokens, and every
//! stream ends with exactly the tokens it produces undisturbed, and matches its grammar.

use std::time::Duration;

use pb::generate_request::{Constraint, Prompt};
use pb::inference_client::InferenceClient;
use proto::tramontane::v1 as pb;
use tests::client::{inference, serving, wait_for};
use tests::fixed;
use tonic::transport::Channel;

/// Whether a stream's text matches its grammar.
type Check = fn(&str) -> bool;

/// What each stream must produce: its constraint, and a check of its text.
fn constraints() -> Vec<(Constraint, Check)> {
    let schema = serde_json::json!({
        "type": "array", "minItems": 24, "maxItems": 24,
        "items": {"type": "object", "properties": {"k": {"type": "string", "pattern": "^[a-z]{4}$"}, "v": {"type": "integer", "minimum": 0, "maximum": 999}},
                  "required": ["k", "v"], "additionalProperties": false},
    });
    fn json_ok(t: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(t).ok().and_then(|v| v.as_array().map(|a| a.len() == 24)).unwrap_or(false)
    }
    fn regex_ok(t: &str) -> bool {
        t.len() == 120 && t.bytes().all(|b| b.is_ascii_lowercase() || b == b' ')
    }
    fn lark_ok(t: &str) -> bool {
        t.split(';').count() == 30 && t.split(';').all(|w| ["north", "south", "east", "west"].contains(&w))
    }
    // A tool call as `tool_choice: any` asks for it: the `[TOOL_CALLS]` control token by id,
    // then a JSON list with the arguments' schema inline.
    fn call_ok(t: &str) -> bool {
        let calls: Vec<serde_json::Value> = serde_json::from_str(t.trim()).unwrap_or_default();
        calls.len() == 1 && calls[0]["name"] == "wx" && calls[0]["arguments"]["c"].as_str().is_some_and(|c| c.len() == 40)
    }
    let arguments = serde_json::json!({"type": "object", "properties": {"c": {"type": "string", "pattern": "^[a-z]{40}$"}}, "required": ["c"],
                                       "additionalProperties": false, "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}});
    let call = format!("start: <[5]> \" [\" {} %json {arguments} \"}}]\"", serde_json::to_string("{\"name\": \"wx\", \"arguments\": ").unwrap());
    vec![
        (Constraint::JsonSchema(schema.to_string()), json_ok),
        (Constraint::Regex("[a-z ]{120}".into()), regex_ok),
        (Constraint::Lark("start: w (\";\" w){29}\nw: \"north\" | \"south\" | \"east\" | \"west\"".into()), lark_ok),
        (Constraint::Lark(call), call_ok),
    ]
}

fn request(i: usize, constraint: Constraint) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: String::new(),
        prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: (0..5).map(|j| 2000 + 37 * i as u32 + j).collect() })),
        sampling: Some(pb::SamplingParams { max_tokens: Some(600), temperature: 1.0, seed: Some(100 + i as u64), ..Default::default() }),
        cache_salt: None,
        constraint: Some(constraint),
    }
}

/// The stream's token ids, text and finish reason.
async fn run(mut c: InferenceClient<Channel>, req: pb::GenerateRequest) -> (Vec<u32>, String, i32) {
    let mut stream = c.generate(req).await.expect("accepted").into_inner();
    let (mut ids, mut text, mut finish) = (Vec::new(), String::new(), 0);
    while let Some(msg) = stream.message().await.expect("no error") {
        ids.extend(msg.token_ids);
        text.push_str(&msg.text);
        finish = msg.finish_reason;
    }
    (ids, text, finish)
}

#[tokio::test]
async fn constrained_streams_stay_token_exact_when_their_worker_is_killed() {
    let mut cluster = fixed::start_with("mixtral-v3-tiny", 2, &[]);
    let url = cluster.coordinator.url();
    let c = inference(url.clone()).await;
    wait_for("two replicas", Duration::from_secs(60), || async { serving(&url).await.len() == 2 }).await;
    let requests: Vec<(pb::GenerateRequest, Check)> =
        (0..12).map(|i| constraints().swap_remove(i % 4)).enumerate().map(|(i, (constraint, ok))| (request(i, constraint), ok)).collect();
    let mut solo = Vec::new();
    for (req, ok) in &requests {
        let (ids, text, finish) = run(c.clone(), req.clone()).await;
        assert_eq!(finish, pb::FinishReason::Stop as i32, "the grammar ends the stream: {text:?}");
        assert!(ok(&text), "the text matches its grammar: {text:?}");
        solo.push(ids);
    }
    let running: Vec<_> = requests.iter().map(|(req, _)| tokio::spawn(run(c.clone(), req.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(running.iter().any(|s| !s.is_finished()), "the kill happens under load");
    cluster.workers[0].kill();
    for (i, (s, (_, ok))) in running.into_iter().zip(&requests).enumerate() {
        let (ids, text, finish) = s.await.expect("joins");
        assert_eq!(ids, solo[i], "request {i}: the tokens differ from its undisturbed run");
        assert!(finish == pb::FinishReason::Stop as i32 && ok(&text), "request {i}: {text:?}");
    }
    assert_eq!(serving(&url).await.len(), 1, "the killed worker's replica is gone: its sequences moved");
}
