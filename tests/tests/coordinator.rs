//! A coordinator over two worker processes (two single-worker replicas), driven through its
//! gRPC API: streamed greedy generations equal the transformers reference, concurrent
//! streams equal their solo runs, aborting frees KV blocks, bad input is refused. A sharded
//! Mixtral replica counts the tokens each expert ran (status, /metrics, `tramctl status
//! --experts`).

use pb::inference_client::InferenceClient;
use proto::tramontane::v1 as pb;
use tests::fixed::{Cluster, start, start_with};
use tests::fixture;
use tonic::Code;
use tonic::transport::Channel;

async fn cluster_status(c: &Cluster) -> pb::ClusterStatusResponse {
    let mut admin = pb::admin_client::AdminClient::connect(c.coordinator.url()).await.expect("connects");
    admin.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner()
}

async fn client(c: &Cluster) -> InferenceClient<Channel> {
    InferenceClient::connect(c.coordinator.url()).await.expect("connects")
}

fn request(prompt: pb::generate_request::Prompt, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: String::new(),
        prompt: Some(prompt),
        sampling: Some(pb::SamplingParams { max_tokens: Some(max_tokens), logprobs: Some(2), ..Default::default() }),
        cache_salt: None,
        constraint: None,
    }
}

/// Streams a request to the end; returns (token ids, text, logprobs, finish reason).
/// A generation's token ids, text, logprobs and finish reason.
type Generated = (Vec<u32>, String, Vec<f32>, i32);

async fn generate(client: &mut InferenceClient<Channel>, req: pb::GenerateRequest) -> Result<Generated, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let (mut ids, mut text, mut lps, mut finish) = (Vec::new(), String::new(), Vec::new(), 0);
    while let Some(msg) = stream.message().await? {
        ids.extend(&msg.token_ids);
        text.push_str(&msg.text);
        lps.extend(msg.logprobs.iter().map(|p| p.token.as_ref().expect("token").logprob));
        if msg.finish_reason != 0 {
            finish = msg.finish_reason;
            let usage = msg.usage.expect("usage on the last message");
            assert_eq!(usage.completion_tokens as usize, ids.len());
        }
    }
    Ok((ids, text, lps, finish))
}

/// Waits (up to 5 s) until no KV block is in use and nothing runs.
async fn all_blocks_freed(c: &mut InferenceClient<Channel>) -> bool {
    for _ in 0..100 {
        let info = c.model_info(pb::ModelInfoRequest {}).await.expect("info").into_inner();
        if info.kv_blocks_used == 0 && info.running == 0 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

#[derive(serde::Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    prompt_text: Option<String>,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_logprobs: Vec<f32>,
}

fn reference(name: &str) -> Reference {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).expect("reads")).expect("parses")
}

#[tokio::test]
async fn streams_reproduce_the_reference_alone_and_concurrently() {
    let cluster = start("mistral-v1-tiny", 2);
    let mut c = client(&cluster).await;
    let info = c.model_info(pb::ModelInfoRequest {}).await.expect("info").into_inner();
    assert_eq!((info.architecture.as_str(), info.replicas, info.kv_blocks_total), ("MistralForCausalLM", 2, 128));
    let status = cluster_status(&cluster).await;
    assert_eq!(status.epoch, 1);
    assert_eq!(status.workers.len(), 2);
    assert_eq!(status.workers.iter().map(|w| w.address.clone()).collect::<Vec<_>>(), cluster.worker_addrs());
    let reference = reference("mistral-v1-tiny");

    // Text prompts (tokenized by the coordinator) and token-id prompts, against transformers.
    for case in &reference.cases {
        let prompt = match &case.prompt_text {
            Some(t) => pb::generate_request::Prompt::Text(t.clone()),
            None => pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: case.prompt_ids.clone() }),
        };
        let n = case.greedy_ids.len() as u32;
        let (ids, text, lps, finish) = generate(&mut c, request(prompt, n)).await.expect("generates");
        assert_eq!(ids, case.greedy_ids);
        assert_eq!(finish, pb::FinishReason::Length as i32);
        assert_eq!(lps.len(), case.greedy_logprobs.len(), "a logprob for every generated token");
        for (a, b) in lps.iter().zip(&case.greedy_logprobs) {
            assert!((a - b).abs() <= 2e-3, "{a} vs {b}");
        }
        let decode = |ids: Vec<u32>| {
            let mut c = c.clone();
            async move { c.detokenize(pb::DetokenizeRequest { ids, skip_special_tokens: false }).await.expect("detok").into_inner().text }
        };
        let whole = decode(case.prompt_ids.iter().chain(&ids).copied().collect()).await;
        let prompt = decode(case.prompt_ids.clone()).await;
        assert_eq!(format!("{prompt}{text}"), whole, "streamed text deltas continue the prompt's text");
    }

    // Sixteen concurrent streams (a token budget of 16 forces chunked prefill and shared
    // batches) produce what each produces alone.
    let prompts: Vec<Vec<u32>> = (0..16u32).map(|i| (0..(3 + i % 7)).map(|j| 100 + 37 * i + j).collect()).collect();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(generate(&mut c, request(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: p.clone() }), 10)).await.expect("alone").0);
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = c.clone();
            let req = request(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: p.clone() }), 10);
            tokio::spawn(async move { generate(&mut c, req).await.expect("concurrent").0 })
        })
        .collect();
    assert_eq!(tasks.len(), alone.len());
    for (task, want) in tasks.into_iter().zip(&alone) {
        assert_eq!(want.len(), 10, "the solo run generated every token");
        assert_eq!(&task.await.expect("joins"), want);
    }
    let info = c.model_info(pb::ModelInfoRequest {}).await.expect("info").into_inner();
    assert_eq!((info.kv_blocks_used, info.running, info.waiting), (0, 0, 0), "everything freed");
}

#[tokio::test]
async fn abort_and_disconnect_free_blocks_and_bad_input_is_refused() {
    let cluster = start("mistral-v1-tiny", 1);
    let mut c = client(&cluster).await;
    let long = |id: &str| pb::GenerateRequest {
        request_id: id.into(),
        prompt: Some(pb::generate_request::Prompt::Text("The tramontane".into())),
        sampling: Some(pb::SamplingParams { max_tokens: Some(900), ..Default::default() }),
        cache_salt: None,
        constraint: None,
    };
    // Abort by id.
    let mut stream = c.generate(long("a")).await.expect("starts").into_inner();
    stream.message().await.expect("first token").expect("a message");
    assert!(c.model_info(pb::ModelInfoRequest {}).await.expect("info").into_inner().kv_blocks_used > 0);
    assert!(c.abort(pb::AbortRequest { request_id: "a".into() }).await.expect("abort").into_inner().aborted);
    // Disconnect: drop a stream mid-generation.
    let mut stream2 = c.generate(long("b")).await.expect("starts").into_inner();
    stream2.message().await.expect("first token").expect("a message");
    drop(stream2);
    assert!(all_blocks_freed(&mut c).await, "aborted and disconnected requests free their KV blocks");
    drop(stream);

    // Bad input: INVALID_ARGUMENT naming the field and the limit.
    let bad = |f: fn(&mut pb::GenerateRequest)| {
        let mut r = request(pb::generate_request::Prompt::Text("hi".into()), 4);
        f(&mut r);
        r
    };
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (bad(|r| r.prompt = Some(pb::generate_request::Prompt::Text(String::new()))), "empty"),
        (bad(|r| r.prompt = None), "prompt"),
        (bad(|r| r.prompt = Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![32000] }))), "32000"),
        (bad(|r| r.sampling.as_mut().expect("s").temperature = f32::NAN), "temperature"),
        (bad(|r| r.sampling.as_mut().expect("s").temperature = -0.5), "temperature"),
        (bad(|r| r.sampling.as_mut().expect("s").top_p = 1.5), "top_p"),
        (bad(|r| r.sampling.as_mut().expect("s").max_tokens = Some(5000)), "2048"),
        (bad(|r| r.sampling.as_mut().expect("s").logprobs = Some(50)), "logprobs"),
        // max_tokens 0 only scores a prompt: without prompt logprobs it asks for nothing.
        (bad(|r| r.sampling.as_mut().expect("s").max_tokens = Some(0)), "prompt_logprobs"),
    ];
    for (req, needle) in cases {
        let err = c.generate(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(needle), "{:?} should mention {needle}", err.message());
    }
    // A deadline (grpc-timeout) that passes mid-generation ends the stream with
    // DEADLINE_EXCEEDED and frees the request's blocks.
    let mut req = tonic::Request::new(long("deadline"));
    req.set_timeout(std::time::Duration::from_millis(300));
    let outcome = async {
        let mut stream = c.generate(req).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<(), tonic::Status>(())
    }
    .await;
    assert_eq!(outcome.expect_err("the deadline passes first").code(), Code::DeadlineExceeded);
    assert!(all_blocks_freed(&mut c).await, "a request past its deadline frees its KV blocks");

    // Still serving.
    let (ids, ..) = generate(&mut c, request(pb::generate_request::Prompt::Text("hi".into()), 3)).await.expect("serves");
    assert_eq!(ids.len(), 3);
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted() {
    // One running sequence and one waiting at most: the third concurrent request is refused.
    let cluster = start_with("mistral-v1-tiny", 1, &["--max-num-seqs", "1", "--max-queue", "1"]);
    let c = client(&cluster).await;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let mut c = c.clone();
            let req = request(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![100 + i, 7, 8] }), 300);
            tokio::spawn(async move { generate(&mut c, req).await })
        })
        .collect();
    let mut refused = 0;
    for t in tasks {
        match t.await.expect("joins") {
            Ok((ids, ..)) => assert_eq!(ids.len(), 300),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("queue is full"), "{}", status.message());
                refused += 1;
            }
        }
    }
    assert!(refused >= 1, "with room for two, four concurrent requests cannot all be accepted");
}

/// Greedy generations of every reference case's prompt, all at once.
fn reference_cases(c: &InferenceClient<Channel>, reference: &Reference) -> Vec<tokio::task::JoinHandle<Generated>> {
    let generation = |case: &Case| {
        let mut c = c.clone();
        let prompt = pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: case.prompt_ids.clone() });
        let req = request(prompt, case.greedy_ids.len() as u32);
        tokio::spawn(async move { generate(&mut c, req).await.expect("generates") })
    };
    reference.cases.iter().map(generation).collect()
}

/// The replica's ranks counted the tokens each expert ran: in every layer, `top_k` for each
/// token the steps carried (each prompt, then each generated token but the last, which no
/// step feeds back); the status, /metrics and `tramctl status --experts` show the same.
async fn check_expert_load(cluster: &Cluster, reference: &Reference) {
    let config = ::cluster::ModelConfig::from_file(&fixture("mixtral-v3-tiny").join("config.json")).expect("config");
    let carried: usize = reference.cases.iter().map(|c| c.prompt_ids.len() + c.greedy_ids.len() - 1).sum();
    let status = cluster_status(cluster).await;
    let [experts] = &status.experts[..] else { panic!("one replica's expert load: {:?}", status.experts) };
    assert_eq!((experts.replica, experts.ep, experts.layers.len()), (0, 2, config.num_hidden_layers));
    let mut load = ::cluster::experts::ExpertLoad::new(config.num_hidden_layers, config.num_local_experts, 2);
    for l in &experts.layers {
        let routed = (carried * config.num_experts_per_tok) as u64;
        assert_eq!(l.tokens.iter().sum::<u64>(), routed, "layer {}: {:?}", l.layer, l.tokens);
        // No copies: each rank ran its own experts' tokens.
        for (rank, &ran) in l.ranks.iter().enumerate() {
            let part = ::cluster::layout::even_part(l.tokens.len(), rank, 2);
            assert_eq!(ran, l.tokens[part.clone()].iter().sum::<u64>(), "layer {}: {:?} {:?}", l.layer, l.tokens, l.ranks);
            let mine: Vec<u64> = l.tokens.iter().enumerate().map(|(e, &n)| if part.contains(&e) { n } else { 0 }).collect();
            load.add(l.layer as usize, rank, &mine).expect("a layer of the model");
        }
    }
    assert_eq!(Some(experts.imbalance), load.imbalance());
    // /metrics labels a replica by its id (a counter's series is never another replica's).
    let metrics = tests::http(&cluster.http, "GET", "/metrics", "");
    let id = imbalance_replica(cluster).expect("the replica's imbalance is exported");
    let gauge = format!("tramontane:expert_parallel_imbalance{{replica=\"{id}\",ep=\"2\"}} {}\n", experts.imbalance);
    assert!(metrics.contains(&gauge), "{gauge} in\n{metrics}");
    for (layer, tokens) in load.tokens.iter().enumerate() {
        for (expert, n) in tokens.iter().enumerate() {
            let line = format!("tramontane:expert_tokens_total{{replica=\"{id}\",layer=\"{layer}\",expert=\"{expert}\"}} {n}\n");
            assert!(metrics.contains(&line), "{line} in\n{metrics}");
        }
    }
    let out = std::process::Command::new(tests::binary("tramctl"))
        .args(["status", "--experts", "--grpc-addr", &cluster.coordinator.addr])
        .output()
        .expect("runs tramctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("replica 0 experts (ep 2, 0 redundant copies): imbalance {:.3}", experts.imbalance)), "{text}");
    let layer0 = load.tokens[0].iter().map(|n| format!("{n:>9}")).collect::<Vec<_>>().join(" ");
    assert!(text.contains(&format!("{:>5} {layer0}", 0)), "{text}");
    eprintln!("{text}");
}

#[tokio::test]
async fn a_sharded_replica_serves_the_reference_and_fails_fast_when_a_rank_dies() {
    // One replica over four worker processes: tensor parallel 2 x expert parallel 2.
    let mut cluster = start_with("mixtral-v3-tiny", 4, &["--tp", "2", "--ep", "2"]);
    let mut c = client(&cluster).await;
    let status = cluster_status(&cluster).await;
    assert_eq!(status.layout, "tp 2 ep 2 pp 1");
    let ranks: Vec<&str> = status.workers.iter().map(|w| w.ranks.as_str()).collect();
    assert_eq!(ranks, ["tp 0/2 ep 0/2 pp 0/1", "tp 1/2 ep 0/2 pp 0/1", "tp 0/2 ep 1/2 pp 0/1", "tp 1/2 ep 1/2 pp 0/1"]);
    assert!(status.workers.iter().all(|w| w.replica == 0));

    let reference = reference("mixtral-v3-tiny");
    let tasks = reference_cases(&c, &reference);
    for (task, case) in tasks.into_iter().zip(&reference.cases) {
        let (ids, _, lps, _) = task.await.expect("joins");
        assert_eq!(ids, case.greedy_ids);
        assert_eq!(lps.len(), case.greedy_logprobs.len(), "a logprob for every generated token");
        for (a, b) in lps.iter().zip(&case.greedy_logprobs) {
            assert!((a - b).abs() <= 2e-3, "{a} vs {b}");
        }
    }
    check_expert_load(&cluster, &reference).await;

    // kill -9 of one rank while a long generation streams: the replica's other ranks fail
    // their step at once, the coordinator re-places the model on the three survivors and the
    // request continues there with exactly the tokens it would have produced.
    let long = || pb::GenerateRequest {
        request_id: String::new(),
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1, 2, 3] })),
        sampling: Some(pb::SamplingParams { max_tokens: Some(300), ..Default::default() }),
        cache_salt: None,
        constraint: None,
    };
    let (undisturbed, ..) = generate(&mut c, long()).await.expect("generates");
    let mut stream = c.generate(long()).await.expect("starts").into_inner();
    let mut ids = stream.message().await.expect("first token").expect("a message").token_ids;
    cluster.workers[3].kill();
    let killed = std::time::Instant::now();
    let rest = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(msg) = stream.message().await.expect("no error reaches the client") {
            ids.extend(msg.token_ids);
        }
    });
    rest.await.expect("no hang");
    assert_eq!(ids, undisturbed, "no token lost, repeated or changed by the move");
    let status = cluster_status(&cluster).await;
    assert!(status.epoch > 1, "a new placement");
    assert_eq!(status.workers.iter().filter(|w| w.state == "serving").count(), 3, "{status:?}");
    eprintln!("recovered from a killed rank in {:?}; now {}", killed.elapsed(), status.layout);
}

/// The id /metrics labels the replica whose expert imbalance it reports with.
fn imbalance_replica(cluster: &Cluster) -> Option<String> {
    let metrics = tests::http(&cluster.http, "GET", "/metrics", "");
    let gauge = "tramontane:expert_parallel_imbalance{replica=\"";
    let line = metrics.lines().find(|l| l.starts_with(gauge))?;
    Some(line[gauge.len()..].split('"').next()?.to_owned())
}

/// `--redundant-experts`: an EP-4 Mixtral replica gets copies of its hottest experts, placed
/// from the load it observed (every second here) and applied in place (the same replica, in a
/// newer epoch), and generates the same tokens and logprobs, bit for bit, with them.
#[tokio::test]
async fn redundant_experts_are_placed_from_the_observed_load_and_change_no_token() {
    let cluster = start_with("mixtral-v3-tiny", 4, &["--ep", "4", "--redundant-experts", "4", "--rebalance-secs", "1"]);
    let c = client(&cluster).await;
    let reference = reference("mixtral-v3-tiny");
    let run = || {
        let tasks = reference_cases(&c, &reference);
        async move {
            let mut out = Vec::new();
            for t in tasks {
                let (ids, _, lps, _) = t.await.expect("joins");
                out.push((ids, lps.iter().map(|l| l.to_bits()).collect::<Vec<u32>>()));
            }
            out
        }
    };
    let before = run().await;
    for ((ids, _), case) in before.iter().zip(&reference.cases) {
        assert_eq!(ids, &case.greedy_ids);
    }
    let (epoch, replica) = (cluster_status(&cluster).await.epoch, imbalance_replica(&cluster));
    assert!(replica.is_some(), "the replica's expert load is exported");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let status = cluster_status(&cluster).await;
        if status.experts.first().is_some_and(|e| e.copies > 0) {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "no redundant experts placed within 30 s: {status:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(status.epoch > epoch, "the copies came with a new epoch");
    assert_eq!(status.experts[0].copies, 4 * status.experts[0].layers.len() as u32, "four copies a layer");
    assert!(status.workers.iter().all(|w| w.state == "serving" && w.replica == 0), "{status:?}");
    assert_eq!(imbalance_replica(&cluster), replica, "the same replica, kept: nothing was loaded again");
    let after = run().await;
    assert_eq!(after, before, "the same tokens and logprob bits with the copies");
}
