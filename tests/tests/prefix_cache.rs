//! Prefix caching through the coordinator's gRPC API, with real worker processes: a request
//! that finds its prompt's blocks cached produces exactly the tokens and logprobs of the same
//! request prefilled in full (a request with a fresh `cache_salt` shares nothing), greedy and
//! seeded, on one worker, a TP-2 and an EP-2 replica; the usage reports the cached tokens,
//! every block reference returns when requests end, and with two replicas a request goes to
//! the replica holding its prefix even when the other is less loaded.

use pb::inference_client::InferenceClient;
use proto::tramontane::v1 as pb;
use tests::fixed::{Cluster, start_with};
use tonic::transport::Channel;

async fn client(c: &Cluster) -> InferenceClient<Channel> {
    InferenceClient::connect(c.coordinator.url()).await.expect("connects")
}

/// What a generation returned: token ids, their logprobs, and the cached prompt tokens.
#[derive(Debug, PartialEq)]
struct Output {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
}

async fn generate(c: &mut InferenceClient<Channel>, prompt: &[u32], sampling: &pb::SamplingParams, salt: Option<&str>) -> (Output, u32) {
    let req = pb::GenerateRequest {
        request_id: String::new(),
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt.to_vec() })),
        sampling: Some(sampling.clone()),
        cache_salt: salt.map(str::to_owned),
        constraint: None,
    };
    let mut stream = c.generate(req).await.expect("starts").into_inner();
    let (mut out, mut cached) = (Output { ids: Vec::new(), logprobs: Vec::new() }, None);
    while let Some(msg) = stream.message().await.expect("streams") {
        out.ids.extend(&msg.token_ids);
        out.logprobs.extend(msg.logprobs.iter().map(|p| p.token.as_ref().expect("token").logprob));
        if let Some(usage) = msg.usage {
            cached = Some(usage.cached_tokens);
        }
    }
    (out, cached.expect("usage on the last message"))
}

/// A 40-token shared prefix and a turn of its own.
fn prompt(turn: u32) -> Vec<u32> {
    (0..40u32).map(|j| 5 + 11 * j).chain((0..4).map(|j| 470 + 7 * turn + j)).collect()
}

fn samplings() -> [pb::SamplingParams; 3] {
    let greedy = pb::SamplingParams { max_tokens: Some(12), logprobs: Some(2), ..Default::default() };
    [
        greedy.clone(),
        pb::SamplingParams { temperature: 0.8, seed: Some(11), ..greedy.clone() },
        pb::SamplingParams { repetition_penalty: Some(1.3), presence_penalty: Some(0.4), ..greedy },
    ]
}

async fn blocks_in_use(c: &mut InferenceClient<Channel>) -> u32 {
    for _ in 0..100 {
        let info = c.model_info(pb::ModelInfoRequest {}).await.expect("info").into_inner();
        if info.kv_blocks_used == 0 && info.running == 0 {
            return 0;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    c.model_info(pb::ModelInfoRequest {}).await.expect("info").into_inner().kv_blocks_used
}

#[tokio::test]
async fn cache_hits_reproduce_full_prefills_on_every_layout() {
    for (model, workers, layout) in [("mistral-v1-tiny", 1, &[][..]), ("mixtral-v3-tiny", 2, &["--tp", "2"][..]), ("mixtral-v3-tiny", 2, &["--ep", "2"][..])] {
        let cluster = start_with(model, workers, layout);
        let mut c = client(&cluster).await;
        for (turn, sampling) in samplings().iter().enumerate() {
            let p = prompt(turn as u32);
            // A salt no other request has: nothing cached, the whole prompt prefilled.
            let (full, cached) = generate(&mut c, &p, sampling, Some(&format!("cold {turn}"))).await;
            assert_eq!(cached, 0, "{model} {layout:?}");
            // Without the salt: the shared prefix cached by the turns before (the first turn
            // finds nothing), then the whole prompt but its last block once it ran.
            let (first, cached) = generate(&mut c, &p, sampling, None).await;
            assert_eq!(first, full, "{model} {layout:?} turn {turn}");
            assert_eq!(cached, if turn == 0 { 0 } else { 32 }, "{model} {layout:?} turn {turn}: 40 shared tokens, blocks of 16");
            let (again, cached) = generate(&mut c, &p, sampling, None).await;
            assert_eq!(again, full, "{model} {layout:?} turn {turn}");
            assert_eq!(cached, 32, "{model} {layout:?}: 44 tokens, the block of the last one is prefilled");
        }
        assert_eq!(blocks_in_use(&mut c).await, 0, "{model} {layout:?}: every block reference returned");
    }
}

#[tokio::test]
async fn a_request_goes_where_its_prefix_is_cached() {
    let cluster = start_with("mistral-v1-tiny", 2, &[]);
    let mut c = client(&cluster).await;
    let sampling = &samplings()[0];
    let p = prompt(0);
    let (expected, _) = generate(&mut c, &p, sampling, None).await;
    // A long generation that shares the prefix (so it goes where the prefix is) keeps that
    // replica busy: least-loaded routing would send the prompt to the other, where nothing is
    // cached.
    let long = pb::GenerateRequest {
        request_id: "long".into(),
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt(5) })),
        sampling: Some(pb::SamplingParams { max_tokens: Some(900), ignore_eos: true, ..Default::default() }),
        cache_salt: None,
        constraint: None,
    };
    let mut busy = c.clone();
    let mut stream = busy.generate(long).await.expect("starts").into_inner();
    stream.message().await.expect("a first token").expect("a message");
    for _ in 0..3 {
        let (out, cached) = generate(&mut c, &p, sampling, None).await;
        assert_eq!(out, expected);
        assert_eq!(cached, 32, "routed to the replica holding the prompt's blocks");
    }
    let status = tests::client::status(cluster.coordinator.url()).await;
    let hits: Vec<u64> = status.workers.iter().map(|w| w.prefix_cache_hits).collect();
    // The long request's hit and the three prompts', all on one replica.
    assert!(hits.contains(&(4 * 32)) && hits.contains(&0), "every hit on one replica: {hits:?}");
    c.abort(pb::AbortRequest { request_id: "long".into() }).await.expect("aborts");
    assert_eq!(blocks_in_use(&mut c).await, 0);
}
