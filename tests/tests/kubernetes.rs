//! The `cpu-tiny` overlay run as the kubelet would run it (`tests::kube`: every container a
//! process with exactly the manifest's command, args and environment, on a host of its own,
//! probes gating its Service and restarting it, `preStop` and grace periods on deletion),
//! then operated as an operator does while 16 streams run: workers scaled 3 → 5 → 2, the
//! leading coordinator's pod deleted, every worker rolled one at a time, a worker's node
//! lost (killed, no drain), a worker hung until its liveness probe restarts it, an etcd member
//! evicted. No request fails and every output equals its undisturbed run. The autoscaler's
//! rule is evaluated on the live /metrics: more workers under the load, fewer after it.
//! Root only (network namespaces, mounts).

use std::time::{Duration, Instant};

use pb::inference_client::InferenceClient;
use proto::tramontane::v1 as pb;
use serde_json::Value;
use tests::kube::{Cluster, render};
use tests::load::{all_complete, solo, streams};
use tonic::transport::Channel;

/// Tokens a stream generates: long enough that every operation happens while they run.
const TOKENS: u32 = 400;

async fn client(c: &Cluster) -> InferenceClient<Channel> {
    let ip = c.service("coordinator").expect("a ready coordinator");
    tests::client::inference(format!("http://{ip}:50051")).await
}

/// The coordinators' /metrics, each parsed.
fn metrics(c: &Cluster) -> Vec<std::collections::HashMap<String, f64>> {
    c.pods_of("coordinator")
        .iter()
        .map(|p| {
            let text = tests::http(&format!("{}:8000", p.host.ip), "GET", "/metrics", "");
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (k, v) = l.rsplit_once(' ')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect()
        })
        .collect()
}

/// The worker count the manifests' HorizontalPodAutoscaler asks for now, from the metrics
/// prometheus-adapter serves it (deploy/k8s/prometheus-adapter.yaml's rules, evaluated here
/// on the live /metrics): each metric's proposal, then the largest within min..max.
fn autoscaler(c: &Cluster) -> (usize, String) {
    let hpa = c.objects("HorizontalPodAutoscaler")[0].clone();
    let current = c.pods_of("worker").len();
    let m = metrics(c);
    let get = |k: &str| m.iter().map(|x| x.get(k).copied().unwrap_or(0.0)).collect::<Vec<_>>();
    let in_flight: f64 = get("tramontane:num_requests_running").iter().sum::<f64>() + get("tramontane:num_requests_waiting").iter().sum::<f64>();
    let kv = get("tramontane:kv_cache_usage_perc").into_iter().fold(0.0, f64::max);
    let quantity = |v: &Value| -> f64 {
        let s = v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
        s.strip_suffix('m').map_or_else(|| s.parse().expect("a quantity"), |m| m.parse::<f64>().expect("a quantity") / 1000.0)
    };
    let min = hpa["spec"]["minReplicas"].as_u64().unwrap_or(1) as f64;
    let max = hpa["spec"]["maxReplicas"].as_u64().expect("maxReplicas") as f64;
    let (mut desired, mut proposals) = (min, Vec::new());
    for metric in hpa["spec"]["metrics"].as_array().expect("metrics") {
        let ext = &metric["external"];
        let name = ext["metric"]["name"].as_str().unwrap_or_default();
        // autoscaling/v2: AverageValue divides the total by the target; Value scales the
        // current count by value / target.
        let (value, proposal) = match name {
            "tramontane_requests_in_flight" => (in_flight, (in_flight / quantity(&ext["target"]["averageValue"])).ceil()),
            "tramontane_kv_cache_usage" => (kv, (current as f64 * kv / quantity(&ext["target"]["value"])).ceil()),
            other => panic!("no rule for {other:?}"),
        };
        proposals.push(format!("{name} {value:.2} -> {proposal}"));
        desired = desired.max(proposal);
    }
    let desired = desired.clamp(min, max) as usize;
    (desired, format!("{current} workers; {}; desired {desired}", proposals.join("; ")))
}

/// Runs `operate` while 16 streams run; every stream must end with its undisturbed tokens.
async fn under_load(c: &mut Cluster, undisturbed: &[Vec<u32>], what: &str, operate: impl FnOnce(&mut Cluster)) {
    let started = Instant::now();
    let running = streams(&client(c).await, TOKENS);
    operate(c);
    all_complete(running, undisturbed).await;
    eprintln!("replay: {what}: 16 streams, 0 failed, outputs equal, {:.1} s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_runs_the_cpu_tiny_overlay() {
    let mut c = Cluster::start(render("cpu-tiny"));
    let started = Instant::now();
    c.wait("every pod ready", Duration::from_secs(180), Cluster::all_ready);
    eprintln!("replay: deployed, every pod ready in {:.1} s", started.elapsed().as_secs_f64());
    let undisturbed = solo(&client(&c).await, TOKENS).await;

    // Scale up under load, and the autoscaler's view of that load.
    let running = streams(&client(&c).await, TOKENS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (busy, why) = autoscaler(&c);
    eprintln!("replay: autoscaler under load: {why}");
    assert!(busy > c.pods_of("worker").len(), "the autoscaler asks for more workers under load: {why}");
    c.scale("worker", 5);
    all_complete(running, &undisturbed).await;
    c.wait("5 workers ready", Duration::from_secs(120), |c| c.all_ready() && c.pods_of("worker").len() == 5);
    let leader = format!("http://{}:50051", c.service("coordinator").expect("a leader"));
    tests::client::wait_for("5 workers serving", Duration::from_secs(60), || {
        let leader = leader.clone();
        async move { tests::client::status(leader).await.workers.iter().filter(|w| w.state == "serving").count() == 5 }
    })
    .await;
    let (quiet, why) = autoscaler(&c);
    eprintln!("replay: autoscaler after the load: {why}");
    assert!(quiet < c.pods_of("worker").len(), "the autoscaler asks for fewer workers after the load: {why}");

    under_load(&mut c, &undisturbed, "workers scaled 5 -> 2", |c| c.scale("worker", 2)).await;
    under_load(&mut c, &undisturbed, "leading coordinator's pod deleted", |c| {
        let leader = c.pods_of("coordinator").into_iter().find(|p| p.ready).expect("a leader").name.clone();
        c.delete(&leader);
    })
    .await;
    c.wait("a new leader ready", Duration::from_secs(60), Cluster::all_ready);
    under_load(&mut c, &undisturbed, "workers rolled one at a time", |c| {
        for i in (0..2).rev() {
            c.delete(&format!("worker-{i}"));
            c.wait("the rolled worker ready", Duration::from_secs(120), Cluster::all_ready);
        }
    })
    .await;
    under_load(&mut c, &undisturbed, "a worker's node lost (SIGKILL, no drain), the pod made again", |c| {
        c.lose("worker-1");
        c.wait("the worker back", Duration::from_secs(120), Cluster::all_ready);
    })
    .await;
    under_load(&mut c, &undisturbed, "a worker hung (SIGSTOP), restarted by its liveness probe", |c| {
        c.freeze("worker-0");
        c.wait("the liveness probe restarts it", Duration::from_secs(120), |c| c.restarts("worker-0") > 0 && c.all_ready());
    })
    .await;
    under_load(&mut c, &undisturbed, "etcd member evicted", |c| {
        c.delete("etcd-1");
        c.wait("etcd-1 back", Duration::from_secs(120), Cluster::all_ready);
    })
    .await;
}
