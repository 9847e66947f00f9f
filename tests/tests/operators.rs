//! The cluster as operators run it: `tramctl up` (the real binary, which starts the real
//! worker and coordinator processes) started before etcd answers, and supervising its
//! workers: a worker killed with `kill -9` under 16 streams of 300 tokens is started again,
//! with etcd and without, while its requests move and complete with the tokens they produce
//! undisturbed. Each case prints its detection and recovery times.

use std::time::{Duration, Instant};

use tests::client::{inference, status, wait_for};
use tests::load::{all_complete, replicas, solo, streams};
use tests::{Etcd, Server};

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

async fn serving(url: &str) -> usize {
    status(url.to_owned()).await.workers.iter().filter(|w| w.state == "serving").count()
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
    eprintln!("tramctl up before etcd: 2 replicas serving {after_etcd:?} after etcd was started ({after_up:?} after tramctl up); 16 × {MAX_TOKENS} tokens complete");
}

/// Three single-worker replicas under `tramctl up` (with `membership` arguments); one worker
/// is killed under 16 streams; they all complete token-exact, and the worker comes back.
async fn a_killed_worker_is_restarted(membership: &[&str], what: &str) {
    let up = tramctl_up(&[membership, &["--workers", "3"]].concat());
    let url = up.url();
    let c = inference(url.clone()).await;
    wait_for("three replicas", LIMIT, || async { replicas(&c).await == 3 }).await;
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
        s.workers.iter().any(|w| w.restarts == 1 && w.state == "serving" && w.pid != victim.pid) && serving(&url).await == 3
    })
    .await;
    let back = killed.elapsed();
    // The restarted worker serves token-exact too.
    all_complete(streams(&c, MAX_TOKENS), &solo).await;
    eprintln!(
        "{what}: kill -9 of 1 of 3 workers under 16 × {MAX_TOKENS} tokens: all complete {completed:?} after the kill, 0 lost; \
         the worker restarted and serving again {back:?} after the kill"
    );
}

#[tokio::test]
async fn tramctl_up_with_etcd_restarts_a_killed_worker() {
    let _one = SERIAL.lock().await;
    let etcd = Etcd::start();
    let url = etcd.url();
    a_killed_worker_is_restarted(&["--etcd", &url], "tramctl up --etcd").await;
}

#[tokio::test]
async fn tramctl_up_without_etcd_restarts_a_killed_worker() {
    let _one = SERIAL.lock().await;
    a_killed_worker_is_restarted(&[], "tramctl up").await;
}
