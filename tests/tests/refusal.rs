//! A model that cannot fit is refused before any worker loads: a coordinator without etcd
//! (its workers started before or after it), `tramctl up`, and a leader on etcd each give
//! the planner's arithmetic and what would fit, and no worker receives an assignment (its
//! epoch stays 0 and its peak memory small). The model is Mistral-7B's shape as a bf16
//! checkpoint with dummy weights (14.5 GB) against workers offering 12 GB; and `tramctl up`
//! splits the host's memory among its workers.

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use coordinator::planner::{Sizing, plan};
use proto::tramontane::v1 as pb;
use proto::tramontane::worker::v1 as wpb;
use tests::client::{status, wait_for};
use tests::{Etcd, Server, binary, fixture, free_port};
use worker::layout::Layout;
use worker::membership::WorkerCard;
use worker::{ModelConfig, Quantization, WeightDType};

/// What each worker offers.
const MEMORY: u64 = 12_000_000_000;
/// A worker that loaded nothing stays far below this.
const IDLE_PEAK_RSS: u64 = 300 << 20;

/// A checkpoint directory of Mistral-7B's shape (bf16) with no weights: config and tokenizer.
fn big_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config: serde_json::Value = serde_json::from_str(worker::config::MISTRAL_7B).expect("config");
    config["torch_dtype"] = "bfloat16".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config.json");
    std::fs::copy(fixture("mistral-v1-tiny").join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("tokenizer.json");
    dir
}

/// The planner's refusal for `workers` workers offering `MEMORY` each, as the processes must print it.
fn expected_refusal(model: &Path, workers: usize) -> String {
    let config = ModelConfig::from_file(&model.join("config.json")).expect("config");
    let sizing = Sizing {
        dtype: WeightDType::Auto,
        quantization: Quantization::Auto,
        load_format: worker::LoadFormat::Dummy,
        kv_blocks: 1024,
        block_size: 16,
        redundant_experts: 0,
        rebalance_secs: 30,
    };
    let cards: Vec<WorkerCard> = (0..workers)
        .map(|i| WorkerCard {
            id: format!("worker-{i}"),
            address: String::new(),
            device: "cpu".into(),
            memory_bytes: MEMORY,
            version: String::new(),
            pid: 0,
            restarts: 0,
        })
        .collect();
    plan(&config, &Layout::default(), &sizing, &cards, &[]).expect_err("the model does not fit")
}

/// Runs `cmd` to its exit (killed after `limit`): its status and stderr.
fn run_to_exit(mut cmd: Command, limit: Duration) -> (ExitStatus, String) {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("starts");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}: {}", reader.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().expect("stderr"))
}

/// The worker's Health: nothing assigned, nothing loaded, its offer as given.
async fn assert_untouched(worker: &Server) {
    let mut c = wpb::worker_client::WorkerClient::connect(worker.url()).await.expect("connects");
    let h = c.health(wpb::HealthRequest {}).await.expect("health").into_inner();
    assert_eq!((h.epoch, h.architecture.as_str(), h.weight_bytes), (0, "", 0), "no assignment reached the worker");
    assert_eq!(h.memory_bytes, MEMORY);
    assert!(h.peak_rss_bytes > 0 && h.peak_rss_bytes < IDLE_PEAK_RSS, "peak RSS {} MB", h.peak_rss_bytes >> 20);
    eprintln!("worker pid {}: epoch 0, peak RSS {:.1} MB", h.pid, h.peak_rss_bytes as f64 / 1e6);
}

#[tokio::test]
async fn a_coordinator_refuses_a_model_that_does_not_fit_before_any_worker_loads() {
    let model = big_model();
    let expected = expected_refusal(model.path(), 1);
    // The coordinator starts first: it waits for the worker's Health, then refuses.
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut coordinator = Command::new(binary("coordinator"));
    coordinator.args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--load-format", "dummy"]).args([
        "--model",
        &model.path().display().to_string(),
        "--worker",
        &address,
    ]);
    let run = std::thread::spawn(move || run_to_exit(coordinator, Duration::from_secs(120)));
    std::thread::sleep(Duration::from_millis(1500));
    let worker = Server::start("worker", &["serve", "--listen", &address, "--memory-bytes", &MEMORY.to_string()]);
    let (exit, stderr) = run.join().expect("coordinator run");
    assert!(!exit.success(), "the coordinator exits non-zero: {stderr}");
    assert!(stderr.contains(&format!("Error: the workers cannot serve the model: {expected}")), "{stderr}");
    assert!(expected.contains("needs 14.50 GB of weights (bf16 as stored)") && expected.contains("would fit: --quantization int8"), "{expected}");
    assert!(!stderr.contains("loading assignment") && !stderr.contains("replica serving"), "{stderr}");
    eprintln!("refusal: {expected}");
    assert_untouched(&worker).await;
}

/// `tramctl plan --model` runs the planner on the checkpoint's config alone: the same refusal
/// with no process started, and the placement (each rank's share) where it fits.
#[test]
fn tramctl_plan_sizes_hardware_without_a_cluster() {
    let model = big_model();
    let plan_on = |extra: &[&str]| {
        let mut cmd = Command::new(binary("tramctl"));
        cmd.args(["plan", "--model", &model.path().display().to_string(), "--workers", "2", "--memory-gb", "12", "--load-format", "dummy"]).args(extra);
        cmd.output().expect("runs")
    };
    let refused = plan_on(&[]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains(&expected_refusal(model.path(), 2)), "{stderr}");
    let fits = plan_on(&["--tp", "2"]);
    assert!(fits.status.success(), "{}", String::from_utf8_lossy(&fits.stderr));
    let table = String::from_utf8_lossy(&fits.stdout);
    let ranks: Vec<&str> = table.lines().filter(|l| l.contains("tp 2 ep 1 pp 1")).collect();
    assert_eq!(ranks.len(), 2, "{table}");
}

#[tokio::test]
async fn tramctl_up_refuses_it_too_and_splits_the_host_memory_among_its_workers() {
    let model = big_model();
    let expected = expected_refusal(model.path(), 2);
    let mut up = Command::new(binary("tramctl"));
    up.args(["up", "--workers", "2", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--load-format", "dummy"])
        .args(["--model", &model.path().display().to_string()])
        .env("TRAMONTANE_MEMORY_BYTES", MEMORY.to_string());
    let started = Instant::now();
    let (exit, stderr) = run_to_exit(up, Duration::from_secs(120));
    assert!(!exit.success(), "tramctl exits non-zero: {stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(expected.contains("but each of the 2 workers has 12.00 GB"), "{expected}");
    eprintln!("tramctl up refused in {:.2} s: {expected}", started.elapsed().as_secs_f64());

    // Without TRAMONTANE_MEMORY_BYTES, two workers share the host's memory rather than each
    // claiming all of it.
    let mut up = Command::new(binary("tramctl"));
    up.args(["up", "--workers", "2", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--kv-blocks", "64"]).env_remove("TRAMONTANE_MEMORY_BYTES");
    let mut cluster = Server::spawn("tramctl", up);
    let http = cluster.next_line().strip_prefix("http listening on ").expect("the HTTP address").to_owned();
    tests::wait_ready(&http, Duration::from_secs(300));
    let workers = status(cluster.url()).await.workers;
    let memory: Vec<u64> = workers.iter().map(|w| w.memory_bytes).collect();
    let total = worker::process::proc_kb_field("/proc/meminfo", "MemTotal");
    assert!(memory.len() == 2 && memory[0] == memory[1] && memory[0] > 0, "{memory:?}");
    assert!(memory[0] * 2 + (512 << 20) <= total, "{memory:?} of {total}");
    eprintln!("tramctl up: each of 2 workers offers {:.2} GB of the host's {:.2} GB", memory[0] as f64 / 1e9, total as f64 / 1e9);
}

#[tokio::test]
async fn a_leader_on_etcd_reports_the_refusal_in_status_and_plan() {
    let model = big_model();
    let expected = expected_refusal(model.path(), 1);
    let etcd = Etcd::start();
    let url = etcd.url();
    let etcd_args = ["--etcd", url.as_str(), "--cluster", "refusal", "--lease-ttl-secs", "2"];
    let worker = Server::start("worker", &[&["serve", "--listen", "127.0.0.1:0", "--memory-bytes", &MEMORY.to_string()][..], &etcd_args].concat());
    let path = model.path().display().to_string();
    let coord_args = ["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--load-format", "dummy", "--model", &path];
    let mut coordinator = Server::start("coordinator", &[&coord_args[..], &etcd_args].concat());
    assert!(coordinator.next_line().starts_with("http listening on "));
    let curl = coordinator.url();
    wait_for("the refusal in status", Duration::from_secs(60), || {
        let curl = curl.clone();
        async move { status(curl).await.no_capacity.starts_with("no replica fits") }
    })
    .await;
    let cluster = status(coordinator.url()).await;
    assert_eq!(cluster.no_capacity, expected.replace("worker-0", &cluster.workers[0].id));
    assert_eq!(cluster.workers[0].memory_bytes, MEMORY);
    let mut admin = pb::admin_client::AdminClient::connect(coordinator.url()).await.expect("connects");
    let refused = admin.plan(pb::PlanRequest {}).await.expect_err("no plan");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(refused.message(), cluster.no_capacity);
    assert_untouched(&worker).await;
}
