//! The cluster as operators run it: `tramctl up` (the real binary, which starts the real
//! worker and coordinator processes) started before etcd answers, and supervising its
//! workers: a worker killed with `kill -9` under 16 streams of 300 tokens (a whole replica,
//! or one rank of a TP-2 replica) is started again, with etcd and without, while its requests
//! move and complete with the tokens they produce undisturbed. A coordinator started before
//! its worker is up and not ready until the worker serves. And SIGTERM to a coordinator under load: it refuses new requests at once
//! (UNAVAILABLE, 503 with Retry-After) and finishes those in flight, or ends them with an
//! explicit error when its shutdown timeout passes, never silently. Each case prints its
//! detection and recovery times.

use std::time::{Duration, Instant};

use tests::client::{inference, serving, status, stream_ids, wait_for};
use tests::cluster::{coordinator, coordinator_with_http, worker};
use tests::load::{all_complete, prompts, replicas, solo, streams};
use tests::{Etcd, Server, fixture, free_port, http, wait_ready};

/// The cases share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MAX_TOKENS: u32 = 300;
const LIMIT: Duration = Duration::from_secs(120);

/// `tramctl up` with `extra` arguments, once its coordinator serves (on free ports).
fn tramctl_up(extra: &[&str]) -> Server {
    let mut args = vec!["up", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--kv-blocks", "256"];
    args.extend(extra);
    let mut up = Server::start("tramctl", &args);
    assert!(up.next_line().starts_with("http listening on "));
    up
}

#[tokio::test]
async fn tramctl_up_started_before_etcd_serves_once_etcd_answers() {
    let _one = SERIAL.lock().await;
    let mut etcd = Etcd::unstarted();
    let url = etcd.url();
    // The workers and the coordinator are up (they printed their addresses) while etcd is not.
    let started = Instant::now();
    let up = tramctl_up(&["--etcd", &url, "--workers", "2"]);
    let etcd_started = Instant::now();
    etcd.resume();
    let c = inference(up.url()).await;
    wait_for("two replicas", LIMIT, || async { replicas(&c).await == 2 }).await;
    let (after_etcd, after_up) = (etcd_started.elapsed(), started.elapsed());
    let solo = solo(&c, MAX_TOKENS).await;
    all_complete(streams(&c, MAX_TOKENS), &solo).await;
    eprintln!(
        "tramctl up before etcd: 2 replicas serving {after_etcd:?} after etcd was started ({after_up:?} after tramctl up); 16 × {MAX_TOKENS} tokens complete"
    );
}

/// `workers` workers in replicas of `tp` ranks under `tramctl up` (with `membership`
/// arguments); one worker is killed under 16 streams; they all complete token-exact, and the
/// worker comes back.
async fn a_killed_worker_is_restarted(membership: &[&str], workers: usize, tp: usize, what: &str) {
    let (count, tp_arg) = (workers.to_string(), tp.to_string());
    let up = tramctl_up(&[membership, &["--workers", &count, "--tp", &tp_arg]].concat());
    let url = up.url();
    let c = inference(url.clone()).await;
    wait_for("every replica", LIMIT, || async { replicas(&c).await as usize == workers / tp }).await;
    let solo = solo(&c, MAX_TOKENS).await;

    let running = streams(&c, MAX_TOKENS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = status(url.clone()).await.workers.into_iter().find(|w| w.state == "serving").expect("a serving worker");
    assert!(victim.pid > 0, "status names the worker's process");
    let killed = Instant::now();
    assert!(std::process::Command::new("kill").args(["-9", &victim.pid.to_string()]).status().expect("kill runs").success());
    assert!(running.iter().any(|s| !s.is_finished()), "the kill happened under load");
    all_complete(running, &solo).await;
    let completed = killed.elapsed();
    wait_for("the restarted worker to serve", LIMIT, || async {
        let s = status(url.clone()).await;
        s.workers.iter().any(|w| w.restarts == 1 && w.state == "serving" && w.pid != victim.pid) && serving(&url).await.len() == workers
    })
    .await;
    let back = killed.elapsed();
    // The restarted worker serves token-exact too.
    all_complete(streams(&c, MAX_TOKENS), &solo).await;
    eprintln!(
        "{what}: kill -9 of 1 of {workers} workers (tp {tp}) under 16 × {MAX_TOKENS} tokens: all complete {completed:?} after the kill, 0 lost; \
         the worker restarted and serving again {back:?} after the kill"
    );
}

/// [`a_killed_worker_is_restarted`] on a fresh etcd.
async fn on_etcd_a_killed_worker_is_restarted(workers: usize, tp: usize, what: &str) {
    let _one = SERIAL.lock().await;
    let etcd = Etcd::start();
    a_killed_worker_is_restarted(&["--etcd", &etcd.url()], workers, tp, what).await;
}

#[tokio::test]
async fn tramctl_up_with_etcd_restarts_a_killed_worker() {
    on_etcd_a_killed_worker_is_restarted(3, 1, "tramctl up --etcd").await;
}

#[tokio::test]
async fn tramctl_up_with_etcd_restarts_a_killed_rank_of_a_tp2_replica() {
    on_etcd_a_killed_worker_is_restarted(4, 2, "tramctl up --etcd --tp 2").await;
}

#[tokio::test]
async fn tramctl_up_without_etcd_restarts_a_killed_worker() {
    let _one = SERIAL.lock().await;
    a_killed_worker_is_restarted(&[], 3, 1, "tramctl up").await;
}

#[tokio::test]
async fn tramctl_up_without_etcd_restarts_a_killed_rank_of_a_tp2_replica() {
    let _one = SERIAL.lock().await;
    a_killed_worker_is_restarted(&[], 4, 2, "tramctl up --tp 2").await;
}

fn sigterm(server: &Server) {
    assert!(std::process::Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().expect("kill runs").success());
}

#[tokio::test]
async fn a_coordinator_is_up_and_not_ready_until_its_worker_starts() {
    let _one = SERIAL.lock().await;
    // Without etcd, the coordinator of a fixed worker that is not running yet.
    let address = format!("127.0.0.1:{}", free_port());
    let model = fixture("mistral-v1-tiny").display().to_string();
    let started = Instant::now();
    let mut c = Server::start("coordinator", &["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--model", &model, "--worker", &address]);
    let http_addr = c.next_line().strip_prefix("http listening on ").expect("the HTTP address").to_owned();
    let listening = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let health = http(&http_addr, "GET", "/health", "");
    assert!(health.starts_with("HTTP/1.1 503"), "not ready without its worker: {health}");
    let mut grpc_health =
        tonic_health::pb::health_client::HealthClient::new(tonic::transport::Endpoint::from_shared(c.url()).expect("url").connect().await.expect("connects"));
    let status = grpc_health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health").into_inner().status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::NotServing as i32);
    // A request sent now is refused with a status clients retry on.
    let mut early = inference(c.url()).await;
    let refused = stream_ids(&mut early, &[1, 2, 3], 4).await;
    assert!(matches!(&refused, Err(s) if s.code() == tonic::Code::Unavailable), "a request before the worker: {refused:?}");
    let _worker = Server::start("worker", &["serve", "--listen", &address]);
    let worker_started = Instant::now();
    let ready_addr = http_addr.clone();
    tokio::task::spawn_blocking(move || wait_ready(&ready_addr, LIMIT)).await.expect("joins");
    let ready = worker_started.elapsed();
    let status = grpc_health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health").into_inner().status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    assert_eq!(solo(&inference(c.url()).await, 16).await.len(), 16);
    eprintln!("coordinator before its worker: listening {listening:?} after its start, ready {ready:?} after the worker's start; 16 requests complete");
}

#[tokio::test]
async fn sigterm_to_the_leader_finishes_its_streams_and_the_standby_takes_over() {
    let _one = SERIAL.lock().await;
    let etcd = Etcd::start();
    let (_w1, _w2) = (worker(&etcd), worker(&etcd));
    let (mut leader, http_addr) = coordinator_with_http(&etcd, &[]);
    let c = inference(leader.url()).await;
    wait_for("two replicas", LIMIT, || async { replicas(&c).await == 2 }).await;
    let standby = coordinator(&etcd, &[]);
    let solo = solo(&c, MAX_TOKENS).await;

    let running = streams(&c, MAX_TOKENS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&leader);
    let signalled = Instant::now();
    // Not ready at once, and new requests are refused with a status clients retry on.
    let refused = wait_for("the leader to report not ready", LIMIT, || {
        let health = http(&http_addr, "GET", "/health", "");
        async move { health.starts_with("HTTP/1.1 503") }
    })
    .await;
    let body = r#"{"model": "mistral-v1-tiny", "prompt": "hello", "max_tokens": 4}"#;
    let refused_http = http(&http_addr, "POST", "/v1/completions", body);
    assert!(
        refused_http.starts_with("HTTP/1.1 503") && refused_http.to_ascii_lowercase().contains("retry-after: 1"),
        "a new completion while shutting down: {refused_http}"
    );
    let mut c3 = c.clone();
    let refused_grpc = stream_ids(&mut c3, &[1, 2, 3], 4).await;
    assert!(matches!(&refused_grpc, Err(s) if s.code() == tonic::Code::Unavailable), "a new gRPC request while shutting down: {refused_grpc:?}");
    assert!(running.iter().any(|s| !s.is_finished()), "the signal came under load");
    // Every stream in flight finishes, token-exact: none is cut.
    all_complete(running, &solo).await;
    let finished = signalled.elapsed();
    let exit = leader.child.wait().expect("the leader exits");
    assert!(exit.success(), "the leader exits cleanly: {exit}");
    let c2 = inference(standby.url()).await;
    let took = wait_for("the standby to serve", LIMIT, || async { replicas(&c2).await == 2 }).await;
    all_complete(streams(&c2, MAX_TOKENS), &solo).await;
    eprintln!(
        "SIGTERM to the leader under 16 × {MAX_TOKENS} tokens: new requests refused {refused:?} after the signal, all 16 in flight finished \
         {finished:?} after it (0 cut), exit 0; the standby serves {took:?} after the leader exited"
    );
}

#[tokio::test]
async fn at_the_shutdown_timeout_every_stream_ends_with_an_explicit_error() {
    let _one = SERIAL.lock().await;
    let etcd = Etcd::start();
    let _w = worker(&etcd);
    let (coord, http_addr) = coordinator_with_http(&etcd, &["--shutdown-timeout", "0"]);
    let c = inference(coord.url()).await;
    wait_for("a replica", LIMIT, || async { replicas(&c).await == 1 }).await;
    let running = streams(&c, MAX_TOKENS);
    let sse = std::thread::spawn(move || {
        let body = r#"{"model": "mistral-v1-tiny", "prompt": "The tramontane", "max_tokens": 300, "stream": true}"#;
        http(&http_addr, "POST", "/v1/completions", body)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&coord);
    let (mut finished, mut ended_with_error) = (0, 0);
    for (i, s) in running.into_iter().enumerate() {
        match s.await.expect("joins") {
            Ok(ids) => {
                assert_eq!(ids.len(), MAX_TOKENS as usize, "request {i} ended early without an error: a silent cut");
                finished += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "request {i}: {status:?}");
                assert!(status.message().contains("shut down"), "request {i}: {status:?}");
                ended_with_error += 1;
            }
        }
    }
    let sse = sse.join().expect("the SSE client");
    let events: Vec<&str> = sse.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "the SSE stream ends with [DONE]: {sse}");
    let last = serde_json::from_str::<serde_json::Value>(events[events.len() - 2]).expect("JSON");
    let ended = last["error"]["message"].as_str().is_some_and(|m| m.contains("shut down")) || last["choices"][0]["finish_reason"].is_string();
    assert!(ended, "the SSE stream's last event is an error or a finish reason, not a silent cut: {last}");
    assert!(ended_with_error > 0, "the signal came while streams ran");
    assert_eq!(prompts().len(), finished + ended_with_error);
    eprintln!(
        "SIGTERM with --shutdown-timeout 0 under 16 streams: {finished} finished, {ended_with_error} ended with UNAVAILABLE, 0 silent; the SSE stream ended with an error event and [DONE]"
    );
}

#[tokio::test]
async fn sigterm_to_tramctl_up_drains_before_it_stops() {
    let _one = SERIAL.lock().await;
    let mut up = tramctl_up(&["--workers", "2"]);
    let c = inference(up.url()).await;
    wait_for("two replicas", LIMIT, || async { replicas(&c).await == 2 }).await;
    let solo = solo(&c, MAX_TOKENS).await;
    let running = streams(&c, MAX_TOKENS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&up);
    let signalled = Instant::now();
    assert!(running.iter().any(|s| !s.is_finished()), "the signal came under load");
    all_complete(running, &solo).await;
    let finished = signalled.elapsed();
    let exit = tokio::task::spawn_blocking(move || up.child.wait()).await.expect("joins").expect("tramctl exits");
    assert!(exit.success(), "tramctl up exits cleanly on SIGTERM: {exit}");
    eprintln!(
        "SIGTERM to tramctl up under 16 × {MAX_TOKENS} tokens: all 16 finished {finished:?} after it (0 cut), the cluster stopped {:?} after it",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn sigterm_to_a_worker_moves_its_sequences_and_it_exits_0() {
    let _one = SERIAL.lock().await;
    let etcd = Etcd::start();
    let (mut w1, _w2) = (worker(&etcd), worker(&etcd));
    let coord = coordinator(&etcd, &[]);
    let url = coord.url();
    let c = inference(url.clone()).await;
    wait_for("two replicas", LIMIT, || async { replicas(&c).await == 2 }).await;
    let solo = solo(&c, MAX_TOKENS).await;
    let running = streams(&c, MAX_TOKENS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&w1);
    let signalled = Instant::now();
    assert!(running.iter().any(|s| !s.is_finished()), "the signal came under load");
    all_complete(running, &solo).await;
    let finished = signalled.elapsed();
    let exit = tokio::task::spawn_blocking(move || w1.child.wait()).await.expect("joins").expect("the worker exits");
    assert!(exit.success(), "the worker exits 0 on SIGTERM: {exit}");
    let exited = signalled.elapsed();
    let gone = wait_for("its card to leave", LIMIT, || async { status(url.clone()).await.workers.len() == 1 }).await;
    eprintln!(
        "SIGTERM to 1 of 2 workers under 16 × {MAX_TOKENS} tokens: all 16 complete {finished:?} after it (0 lost), the worker exited 0 \
         {exited:?} after it, its card left {:?} after it",
        signalled.elapsed().max(gone)
    );
}

/// A checkpoint directory (the fixture's tokenizer, no weights: `--load-format dummy`) of a
/// model of 0.7 B parameters in f32, so that a TP-2 replica takes seconds to load.
fn slow_to_load_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::copy(fixture("mistral-v1-tiny").join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("copies the tokenizer");
    let config = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu", "torch_dtype": "float32",
        "hidden_size": 1024, "intermediate_size": 5632, "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 4,
        "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("writes config.json");
    dir
}

/// `tramctl <args> --grpc-addr <addr>`: its stdout; panics when it fails.
fn tramctl(args: &[&str], addr: &str) -> String {
    let out = std::process::Command::new(tests::binary("tramctl")).args(args).args(["--grpc-addr", addr]).output().expect("tramctl runs");
    assert!(out.status.success(), "tramctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The workers' (id, state, pid) as `tramctl status --json` prints them.
fn worker_states(addr: &str) -> Vec<(String, String, u64)> {
    let status: serde_json::Value = serde_json::from_str(&tramctl(&["status", "--json"], addr)).expect("JSON");
    let workers = status["workers"].as_array().expect("workers").iter();
    workers
        .map(|w| (w["id"].as_str().unwrap_or_default().to_owned(), w["state"].as_str().unwrap_or_default().to_owned(), w["pid"].as_u64().unwrap_or(0)))
        .collect()
}

/// The placement controller never waits on a load: while a TP-2 replica loads, `tramctl
/// status` answers (its two workers "loading", the third "idle") and `tramctl drain` of the
/// idle worker answers with the worker released (it exits) before the load has ended; then the
/// replica serves.
#[tokio::test]
async fn tramctl_status_and_drain_answer_while_a_replica_loads() {
    let _one = SERIAL.lock().await;
    let etcd = Etcd::start();
    let model = slow_to_load_model();
    let model_dir = model.path().display().to_string();
    // A worker started by hand, too small to hold a rank of the model, joins the cluster of
    // `tramctl up`'s two: it stays idle.
    let mut third = tests::cluster::worker_with(None, &etcd, &["--memory-bytes", "100000000"]);
    let up = tramctl_up(&["--etcd", &etcd.url(), "--cluster", "t", "--model", &model_dir, "--load-format", "dummy", "--workers", "2", "--tp", "2"]);
    let addr = up.addr.clone();
    let count = |states: &[(String, String, u64)], state: &str| states.iter().filter(|w| w.1 == state).count();
    let started = Instant::now();
    let loading = loop {
        let states = worker_states(&addr);
        if count(&states, "loading") == 2 && count(&states, "idle") == 1 {
            break states;
        }
        assert!(count(&states, "serving") == 0, "the replica served before a status showed it loading: {states:?}");
        assert!(started.elapsed() < LIMIT, "no status showed two workers loading and one idle: {states:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seen = started.elapsed();
    let (idle, _, pid) = loading.iter().find(|w| w.1 == "idle").expect("an idle worker").clone();
    assert_eq!(pid, u64::from(third.child.id()), "the small worker is the idle one: {loading:?}");
    let drain_started = Instant::now();
    let drained = tramctl(&["drain", &idle], &addr);
    let drain_took = drain_started.elapsed();
    assert!(drained.contains("drained"), "{drained}");
    let after = worker_states(&addr);
    assert_eq!(count(&after, "loading"), 2, "the drain answered only after the load: {after:?}");
    assert!(after.iter().all(|w| w.0 != idle), "the drained worker is gone from the status: {after:?}");
    let exited = wait_for("the drained worker to exit", LIMIT, || std::future::ready(third.child.try_wait().expect("waits").is_some())).await;
    assert!(third.child.wait().expect("reaped").success(), "the drained worker exits 0");
    assert_eq!(count(&worker_states(&addr), "loading"), 2, "the load ended before the drained worker exited");
    // A worker nobody knows: NOT_FOUND, naming it.
    let mut admin = proto::tramontane::v1::admin_client::AdminClient::connect(up.url()).await.expect("connects");
    let unknown = admin.drain(proto::tramontane::v1::DrainRequest { worker_id: "nobody".into() }).await.expect_err("no such worker");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("\"nobody\""), "{unknown:?}");
    let served = wait_for("the replica to serve", LIMIT, || async { serving(&up.url()).await.len() == 2 }).await;
    let mut c = inference(up.url()).await;
    let ids = stream_ids(&mut c, &prompts()[0], 8).await.expect("the loaded replica generates");
    assert_eq!(ids.len(), 8);
    eprintln!(
        "while a TP-2 replica loaded: status showed it loading {seen:?} after the start; drain of the idle worker answered in {drain_took:?}, it exited {exited:?} later; the replica served {served:?} after that"
    );
}
