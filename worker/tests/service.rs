//! The worker process over a real socket: a coordinator-like client loads an assignment,
//! drives steps that reproduce the transformers reference, and is fenced by epochs.

mod common;

use common::{WorkerProcess, fixture, reference};
use pb::worker_client::WorkerClient;
use proto::tramontane::worker::v1 as pb;
use tonic::Code;

fn load_request(epoch: u64) -> pb::LoadAssignmentRequest {
    pb::LoadAssignmentRequest {
        epoch,
        model_path: fixture("mixtral-f32-tiny").display().to_string(),
        dtype: pb::WeightDtype::F32 as i32,
        kv_blocks: 64,
        block_size: 16,
        ..Default::default()
    }
}

fn greedy() -> Option<pb::Sampling> {
    Some(pb::Sampling { top_p: 1.0, logprobs: 0, ..Default::default() })
}

#[tokio::test]
async fn a_worker_process_reproduces_the_reference_and_fences_epochs() {
    let worker = WorkerProcess::start();
    let mut client = WorkerClient::connect(worker.url()).await.expect("connects");

    // The standard gRPC health service (Kubernetes' probes) answers SERVING from the start.
    let channel = tonic::transport::Endpoint::from_shared(worker.url()).expect("a URL").connect().await.expect("connects");
    let mut probe = tonic_health::pb::health_client::HealthClient::new(channel);
    let health = probe.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health").into_inner();
    assert_eq!(health.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

    // Nothing loaded yet.
    let err = client.step(pb::StepRequest { epoch: 0, sequences: vec![], released: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(client.health(pb::HealthRequest {}).await.expect("health").into_inner().epoch, 0);

    let loaded = client.load_assignment(load_request(3)).await.expect("loads").into_inner();
    assert_eq!(loaded.architecture, "MixtralForCausalLM");
    assert!(!loaded.kept, "a first load starts with an empty KV cache");
    let health = client.health(pb::HealthRequest {}).await.expect("health").into_inner();
    assert_eq!((health.epoch, health.kv_blocks), (3, 64));

    // Two sequences in one batch, prefill then decode, against the reference.
    let reference = reference("mixtral-f32-tiny");
    let cases = [&reference.cases[2], &reference.cases[3]];
    let tables: [Vec<u32>; 2] = [vec![5, 6], vec![9, 1, 2]];
    let mut generated: [Vec<u32>; 2] = Default::default();
    let mut logprobs: [Vec<f32>; 2] = Default::default();
    for step in 0..cases[0].greedy_ids.len() {
        let sequences = (0..2)
            .map(|i| {
                let (tokens, start_pos) = if step == 0 {
                    (cases[i].prompt_ids.clone(), 0)
                } else {
                    (vec![*generated[i].last().expect("token")], (cases[i].prompt_ids.len() + step - 1) as u32)
                };
                pb::SequenceStep {
                    seq_id: 100 + i as u64,
                    tokens,
                    start_pos,
                    block_table: tables[i].clone(),
                    sampling: greedy(),
                    prompt_logprobs: None,
                    keep_history: None,
                    embed: 0,
                    history: vec![],
                    grammar: None,
                }
            })
            .collect();
        let resp = client.step(pb::StepRequest { epoch: 3, sequences, released: vec![] }).await.expect("step").into_inner();
        for (i, r) in resp.results.iter().enumerate() {
            assert_eq!(r.seq_id, 100 + i as u64);
            let s = r.sampled.as_ref().expect("sampled");
            generated[i].push(s.token_id);
            logprobs[i].push(s.logprob);
        }
    }
    for i in 0..2 {
        assert_eq!(generated[i], cases[i].greedy_ids);
        for (a, b) in logprobs[i].iter().zip(&cases[i].greedy_logprobs) {
            assert!((a - b).abs() <= 2e-3, "{a} vs {b}");
        }
    }

    // Fencing: steps from another epoch and older assignments are refused.
    let one = |epoch| pb::StepRequest {
        epoch,
        sequences: vec![pb::SequenceStep {
            seq_id: 1,
            tokens: vec![5],
            start_pos: 0,
            block_table: vec![0],
            sampling: greedy(),
            prompt_logprobs: None,
            keep_history: None,
            embed: 0,
            history: vec![],
            grammar: None,
        }],
        released: vec![],
    };
    for stale in [2, 4] {
        let err = client.step(one(stale)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("epoch"), "{}", err.message());
    }
    let err = client.load_assignment(load_request(2)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    client.step(one(3)).await.expect("the current epoch still serves");
    // The same assignment in a newer epoch keeps the shard and its KV cache (a coordinator's
    // prefix cache may go on naming its blocks); it says so.
    assert!(client.load_assignment(load_request(3)).await.expect("loads").into_inner().kept);

    // Bad input is INVALID_ARGUMENT, and the worker keeps serving.
    let mut bad = one(3);
    bad.sequences[0].sampling = Some(pb::Sampling { temperature: -1.0, ..greedy().expect("sampling") });
    let err = client.step(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("temperature"), "{}", err.message());
    let mut bad = one(3);
    bad.sequences[0].tokens = vec![512];
    assert_eq!(client.step(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let mut bad = one(3);
    bad.sequences[0].block_table = vec![64];
    assert_eq!(client.step(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let mut missing = load_request(5);
    missing.model_path = "/nonexistent/model".into();
    let err = client.load_assignment(missing).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("config.json"), "{}", err.message());
    client.step(one(3)).await.expect("still serving");
}

#[tokio::test]
async fn a_killed_worker_fails_calls_quickly() {
    let mut worker = WorkerProcess::start();
    let mut client = WorkerClient::connect(worker.url()).await.expect("connects");
    client.health(pb::HealthRequest {}).await.expect("health");
    worker.child.kill().expect("kill -9");
    worker.child.wait().expect("reaped");
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), client.health(pb::HealthRequest {})).await;
    let err = result.expect("no hang").unwrap_err();
    assert!(matches!(err.code(), Code::Unavailable | Code::Unknown), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
