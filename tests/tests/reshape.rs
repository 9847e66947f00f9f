//! Reshaping while serving, on a real etcd with real coordinator and worker processes,
//! through `tramctl scale`: four workers go from two TP-2 replicas of a dense Mistral to one
//! TP-4 replica and back, and a Mixtral from two EP-2 replicas to one EP-4 replica and back,
//! each under 16 concurrent streams; then to EP 4 again with the leader killed as soon as the
//! new plan is stored: the standby, whose flags say EP 2, finishes it. No request may fail
//! and no replica may fail (the old ones serve until the new ones do); a stream that moved
//! across layouts keeps its tokens up to where a rounding-level tie parts it from its
//! reference run, and from there is exactly the new layout's continuation. Shapes the model
//! or the workers cannot take are refused, saying why.

use std::time::{Duration, Instant};

use coordinator::planner::{self, Sizing};
use pb::inference_client::InferenceClient;
use proto::tramontane::v1 as pb;
use tests::client::{inference, status, stream_ids, wait_for};
use tests::cluster::{coordinator_of, worker, worker_with};
use tests::load::{self, Streams, all_complete, prompts, replicas};
use tests::{Etcd, Server};
use tonic::transport::Channel;

/// The cases share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MAX_TOKENS: u32 = 120;
const LIMIT: Duration = Duration::from_secs(90);

fn streams(c: &InferenceClient<Channel>) -> Streams {
    load::streams(c, MAX_TOKENS)
}

async fn solo(c: &mut InferenceClient<Channel>) -> Vec<Vec<u32>> {
    load::solo(c, MAX_TOKENS).await
}

/// `tramctl scale ARGS` against the coordinator at `addr`: whether it succeeded, and what it
/// printed (stdout, then stderr).
async fn tramctl_scale(addr: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new(tests::binary("tramctl"));
    cmd.args(["scale", "--grpc-addr", addr]).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.expect("joins").expect("tramctl runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("tramctl scale {}: {text}", args.join(" "));
    (out.status.success(), text)
}

/// A counter's value on /metrics (0 when it has no sample yet).
fn counter(http: &str, name: &str) -> f64 {
    let text = tests::http(http, "GET", "/metrics", "");
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
}

/// Every stream completed with `reference`'s tokens, or, from where a rounding-level tie
/// parted it (the move to another layout), exactly the current layout's continuation of what
/// came before; the number that parted.
async fn by_the_continuation_rule(running: Streams, reference: &[Vec<u32>], c: &mut InferenceClient<Channel>) -> usize {
    let mut parted = 0;
    for (i, s) in running.into_iter().enumerate() {
        let ids = s.await.expect("joins").unwrap_or_else(|e| panic!("request {i} failed: {e:?}"));
        assert_eq!(ids.len(), reference[i].len(), "request {i}: every token");
        if let Some(d) = ids.iter().zip(&reference[i]).position(|(a, b)| a != b) {
            parted += 1;
            let prefix: Vec<u32> = prompts()[i].iter().chain(&ids[..d]).copied().collect();
            let rest = stream_ids(c, &prefix, MAX_TOKENS - d as u32).await.expect("continuation");
            assert_eq!(rest, ids[d..], "request {i}: after token {d} the stream is not the new layout's continuation");
        }
    }
    parted
}

/// Reshapes the cluster at `coord` with `tramctl scale ARGS --wait` under 16 streams, checks
/// the streams by the continuation rule and that no replica failed; the new layout's own
/// greedy tokens and the time the reshape took.
async fn reshape_under_load(coord: &Server, http: &str, args: &[&str], layout: &str, n: u32, reference: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let mut c = inference(coord.url()).await;
    let retired = counter(http, "tramontane:replica_retirements_total");
    let running = streams(&c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let args: Vec<&str> = args.iter().copied().chain(["--wait"]).collect();
    let (ok, text) = tramctl_scale(&coord.addr, &args).await;
    let took = started.elapsed();
    assert!(ok, "tramctl scale {args:?}: {text}");
    assert!(running.iter().any(|s| !s.is_finished()), "the reshape happened under load");
    let now = status(coord.url()).await;
    assert_eq!(now.layout, layout);
    assert_eq!(replicas(&c).await, n);
    let parted = by_the_continuation_rule(running, reference, &mut c).await;
    assert_eq!(counter(http, "tramontane:replica_failures_total"), 0.0, "no replica failed: the old ones served until the new ones did");
    assert!(counter(http, "tramontane:replica_retirements_total") > retired, "the old replicas were retired");
    eprintln!("reshaped to {layout} × {n} under 16 streams in {took:?} (tramctl scale --wait), 0 failed, {parted} of 16 parted at a rounding-level tie");
    solo(&mut c).await
}

#[tokio::test]
async fn dense_replicas_reshape_from_two_tp2_to_one_tp4_and_back_under_load() {
    let _one = SERIAL.lock().await;
    let etcd = Etcd::start();
    let _workers: Vec<Server> = (0..4).map(|_| worker(&etcd)).collect();
    let (coord, http) = coordinator_of(None, &etcd, "mistral-v1-tiny", &["--tp", "2"]);
    let mut c = inference(coord.url()).await;
    wait_for("two TP-2 replicas", LIMIT, || async { replicas(&c).await == 2 }).await;
    assert_eq!(status(coord.url()).await.layout, "tp 2 ep 1 pp 1");
    let tp2 = solo(&mut c).await;
    let tp4 = reshape_under_load(&coord, &http, &["--tp", "4"], "tp 4 ep 1 pp 1", 1, &tp2).await;
    let back = reshape_under_load(&coord, &http, &["--tp", "2"], "tp 2 ep 1 pp 1", 2, &tp4).await;
    assert_eq!(back, tp2, "back on TP 2, every prompt generates what it did before");
}

#[tokio::test]
async fn mixtral_widens_its_expert_group_under_load_and_a_standby_finishes_a_reshape() {
    let _one = SERIAL.lock().await;
    let etcd = Etcd::start();
    let _workers: Vec<Server> = (0..4).map(|_| worker(&etcd)).collect();
    let (mut leader, http) = coordinator_of(None, &etcd, "mixtral-v3-tiny", &["--ep", "2"]);
    let mut c = inference(leader.url()).await;
    wait_for("two EP-2 replicas", LIMIT, || async { replicas(&c).await == 2 }).await;
    assert_eq!(status(leader.url()).await.layout, "tp 1 ep 2 pp 1");
    // The standby's flags say EP 2, as the leader's did.
    let (standby, _) = coordinator_of(None, &etcd, "mixtral-v3-tiny", &["--ep", "2"]);
    assert!(!status(standby.url()).await.leader, "the second coordinator waits as a standby");
    let ep2 = solo(&mut c).await;
    let ep4 = reshape_under_load(&leader, &http, &["--ep", "4"], "tp 1 ep 4 pp 1", 1, &ep2).await;
    let back = reshape_under_load(&leader, &http, &["--ep", "2"], "tp 1 ep 2 pp 1", 2, &ep4).await;
    assert_eq!(back, ep2, "back on EP 2, every prompt generates what it did before");

    // To EP 4 again; the leader dies as soon as the new plan is stored, while the new replica
    // loads beside the old ones. The standby, whose flags say EP 2, finds the wanted shape
    // with the plan and finishes the reshape.
    let mut admin = pb::admin_client::AdminClient::connect(leader.url()).await.expect("connects");
    let scaled = admin.scale(pb::ScaleRequest { ep: 4, ..Default::default() }).await.expect("scales").into_inner();
    leader.kill();
    let killed = Instant::now();
    assert_eq!(scaled.replicas.len(), 1);
    assert_eq!(scaled.replicas[0].layout, "tp 1 ep 4 pp 1");
    let mut c2 = inference(standby.url()).await;
    let took =
        wait_for("the standby to finish the reshape", LIMIT, || async { replicas(&c2).await == 1 && status(standby.url()).await.layout == "tp 1 ep 4 pp 1" })
            .await;
    let now = status(standby.url()).await;
    assert!(now.leader && now.epoch > scaled.epoch, "the standby leads at a newer epoch: {} after {}", now.epoch, scaled.epoch);
    all_complete(streams(&c2), &ep4).await;
    assert_eq!(solo(&mut c2).await, ep4);
    eprintln!("leader killed as the reshape to EP 4 was stored: the standby finished it {took:?} after the kill ({:?} in all)", killed.elapsed());
}

#[tokio::test]
async fn shapes_the_model_or_the_workers_cannot_take_are_refused() {
    let _one = SERIAL.lock().await;
    let model = tests::fixture("mistral-v1-tiny");
    let config = cluster::ModelConfig::from_file(&model.join("config.json")).expect("config");
    // As the coordinator sizes ranks (the cluster helper's 128 KV blocks).
    let sizing = Sizing {
        dtype: cluster::WeightDType::Auto,
        quantization: cluster::Quantization::Auto,
        load_format: cluster::LoadFormat::Safetensors,
        kv_blocks: 128,
        block_size: 16,
        redundant_experts: 0,
        rebalance_secs: 30,
    };
    let layout = |tp| cluster::layout::Layout { tp, ep: 1, pp: 1, stage_layers: Vec::new() };
    let (w2, kv2) = planner::rank_memory(&config, &layout(2), &sizing);
    let (w4, kv4) = planner::rank_memory(&config, &layout(4), &sizing);
    // Each worker holds a TP-2 rank or a TP-4 rank, but not both at once.
    let memory = (w2 + kv2 + w4 + kv4 - 1).to_string();
    let etcd = Etcd::start();
    let _workers: Vec<Server> = (0..4).map(|_| worker_with(None, &etcd, &["--memory-bytes", &memory])).collect();
    let (coord, _) = coordinator_of(None, &etcd, "mistral-v1-tiny", &["--tp", "2"]);
    let c = inference(coord.url()).await;
    wait_for("two TP-2 replicas", LIMIT, || async { replicas(&c).await == 2 }).await;
    let epoch = status(coord.url()).await.epoch;
    for (args, why) in [
        (&["--tp", "3"][..], "must divide the 4 attention heads"),
        (&["--tp", "4", "--pp", "2"][..], "hold no replica of it"),
        (&["--tp", "4"][..], "at once while the new replica loads"),
    ] {
        let (ok, text) = tramctl_scale(&coord.addr, args).await;
        assert!(!ok, "tramctl scale {args:?} is refused");
        assert!(text.contains("cannot scale to") && text.contains(why), "tramctl scale {args:?}: {text}");
    }
    let now = status(coord.url()).await;
    assert_eq!((now.layout.as_str(), now.epoch), ("tp 2 ep 1 pp 1", epoch), "a refused shape changes nothing");
    // The gRPC codes: a shape the model cannot take is an invalid argument, one the workers
    // cannot hold a failed precondition.
    let mut admin = pb::admin_client::AdminClient::connect(coord.url()).await.expect("connects");
    let bad = admin.scale(pb::ScaleRequest { tp: 3, ..Default::default() }).await.expect_err("refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    let full = admin.scale(pb::ScaleRequest { tp: 4, ..Default::default() }).await.expect_err("refused");
    assert_eq!(full.code(), tonic::Code::FailedPrecondition, "{full:?}");
}
