//! Faults across hosts: etcd, the coordinator and every worker each in a network namespace of
//! their own, on a bridge (see `tests::net`), under 16 streams of 300 tokens. (a) A worker cut
//! from etcd but not from the coordinator: its lease expires, the coordinator re-places its
//! requests and fences it, the worker refuses the old epoch's steps on the wire, and once the
//! link heals it registers again and serves. (b) The link between the two ranks of a TP-2
//! replica cut (each still reaches etcd and the coordinator): a collective times out, the
//! replica fails and its requests move, neither rank keeps the dead link, and once healed the
//! two form a replica again. (d) etcd cut from everyone for longer than the lease TTL: every
//! lease expires there, the workers register again, the leader leads again, nothing moves.
//! Every request completes with the tokens it produces undisturbed; each case prints its
//! detection and recovery times. Needs root (network namespaces): elsewhere each case says so
//! and stops.

use std::time::{Duration, Instant};

use proto::tramontane::v1::inference_client::InferenceClient;
use proto::tramontane::worker::v1 as wpb;
use tests::client::{inference, serving, status, wait_for};
use tests::cluster::{TTL_SECS, coordinator_on, worker_on, worker_with};
use tests::load::{all_complete, replicas, solo, streams};
use tests::net::{Host, Net};
use tests::{Etcd, Server};
use tonic::transport::Channel;

/// The cases share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MAX_TOKENS: u32 = 300;
const LIMIT: Duration = Duration::from_secs(120);

/// A fresh network, or `None` (with the reason printed) where namespaces are refused.
fn network() -> Option<Net> {
    match Net::new() {
        Ok(net) => Some(net),
        Err(e) => {
            eprintln!("skipped: this machine refuses network namespaces (run as root): {e}");
            None
        }
    }
}

/// etcd, a coordinator and two workers, each on a host of its own, serving two replicas, with
/// the undisturbed run's tokens and the placement epoch.
struct TwoWorkers {
    _net: Net,
    etcd_host: Host,
    coordinator_host: Host,
    h1: Host,
    h2: Host,
    etcd: Etcd,
    w1: Server,
    w2: Server,
    coordinator: Server,
    url: String,
    c: InferenceClient<Channel>,
    solo: Vec<Vec<u32>>,
    epoch: u64,
}

async fn two_workers(mut net: Net) -> TwoWorkers {
    let (etcd_host, coordinator_host, h1, h2) = (net.host("etcd"), net.host("coord"), net.host("w1"), net.host("w2"));
    let etcd = Etcd::on(&etcd_host);
    let (w1, w2) = (worker_on(Some(&h1), &etcd), worker_on(Some(&h2), &etcd));
    let (coordinator, _) = coordinator_on(Some(&coordinator_host), &etcd, &[]);
    let url = coordinator.url();
    let c = inference(url.clone()).await;
    wait_for("two replicas", LIMIT, || async { replicas(&c).await == 2 }).await;
    let solo = solo(&c, MAX_TOKENS).await;
    let epoch = status(url.clone()).await.epoch;
    TwoWorkers { _net: net, etcd_host, coordinator_host, h1, h2, etcd, w1, w2, coordinator, url, c, solo, epoch }
}

#[tokio::test]
async fn a_worker_cut_from_etcd_is_fenced_its_requests_move_and_healed_it_serves_again() {
    let _one = SERIAL.lock().await;
    let Some(net) = network() else { return };
    let TwoWorkers { _net, etcd_host, coordinator_host: _, h1, w1, etcd: _etcd, w2: _w2, coordinator: _coordinator, url, c, solo, epoch, .. } =
        two_workers(net).await;

    // Waves of 16 streams, back to back, from the cut until the coordinator has given w1 up
    // and one more wave ran without it.
    h1.cut(&etcd_host);
    let cut = Instant::now();
    let mut waves = 0;
    let gone = loop {
        all_complete(streams(&c, MAX_TOKENS), &solo).await;
        waves += 1;
        if !status(url.clone()).await.workers.iter().any(|w| w.address == w1.addr) {
            break cut.elapsed();
        }
        assert!(cut.elapsed() < LIMIT, "w1's card outlived its lease by far");
    };
    all_complete(streams(&c, MAX_TOKENS), &solo).await;
    waves += 1;

    // The coordinator still reaches w1, and has fenced it: a step of the old epoch (as a
    // coordinator that missed the change would send) is refused on the wire.
    let mut w = wpb::worker_client::WorkerClient::connect(w1.url()).await.expect("the coordinator's side still reaches w1");
    wait_for("w1 to be fenced", LIMIT, || {
        let mut w = w.clone();
        async move { w.health(wpb::HealthRequest {}).await.is_ok_and(|h| h.into_inner().epoch > epoch) }
    })
    .await;
    let fenced = cut.elapsed();
    let refused = w.step(wpb::StepRequest { epoch, sequences: Vec::new() }).await.expect_err("a step of the old epoch is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("stale placement epoch"), "{refused:?}");
    assert_eq!(w.health(wpb::HealthRequest {}).await.expect("health").into_inner().weight_bytes, 0, "the fenced worker unloaded its model");

    // The replica left serves on, token-exact.
    all_complete(streams(&c, MAX_TOKENS), &solo).await;
    assert_eq!(serving(&url).await.len(), 1);
    // Healed, w1 registers again and the coordinator places a replica on it.
    h1.heal(&etcd_host);
    let healed = Instant::now();
    wait_for("w1 to serve again after the heal", LIMIT, || async { serving(&url).await.len() == 2 }).await;
    let back = healed.elapsed();
    all_complete(streams(&c, MAX_TOKENS), &solo).await;
    eprintln!(
        "(a) w1 cut from etcd: its card gone {gone:?} after the cut (lease TTL {TTL_SECS} s); {waves} waves of 16 × {MAX_TOKENS} tokens from the cut on, \
         0 lost; w1 fenced (its step of epoch {epoch} refused: {}) {fenced:?} after the cut; \
         healed, it served again {back:?} after the heal",
        refused.message(),
    );
}

#[tokio::test]
async fn a_cut_between_two_ranks_fails_their_replica_and_healed_they_link_again() {
    let _one = SERIAL.lock().await;
    let Some(mut net) = network() else { return };
    let (etcd_host, coordinator_host) = (net.host("etcd"), net.host("coord"));
    let hosts = [net.host("w1"), net.host("w2"), net.host("w3")];
    let etcd = Etcd::on(&etcd_host);
    let mut workers: Vec<_> = hosts.iter().map(|h| worker_with(Some(h), &etcd, &["--comm-timeout-secs", "3"])).collect();
    let (coordinator, _) = coordinator_on(Some(&coordinator_host), &etcd, &["--tp", "2"]);
    let url = coordinator.url();
    let c = inference(url.clone()).await;
    // Three workers in replicas of 2 ranks: one TP-2 replica and the third alone.
    wait_for("both replicas", LIMIT, || async { replicas(&c).await == 2 }).await;
    let solo = solo(&c, MAX_TOKENS).await;

    // Cut the TP-2 replica's two ranks from each other mid-stream (each still reaches etcd
    // and the coordinator): a collective times out, the replica fails, and its requests move.
    let pair: Vec<String> = status(url.clone()).await.workers.into_iter().filter(|w| w.ranks.contains("/2")).map(|w| w.address).collect();
    assert_eq!(pair.len(), 2, "{pair:?}");
    let host_of = |addr: &str| workers.iter().position(|w| w.addr == addr).expect("a worker of ours");
    let (a, b) = (host_of(&pair[0]), host_of(&pair[1]));
    let load = streams(&c, MAX_TOKENS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    hosts[a].cut(&hosts[b]);
    let cut = Instant::now();
    all_complete(load, &solo).await;
    let completed = cut.elapsed();

    // Neither cut rank keeps the old replica's model: each serves the new replica or is
    // unloaded, so neither runs an old step again.
    let spare = 3 - a - b;
    for i in [a, b] {
        let w = wpb::worker_client::WorkerClient::connect(workers[i].url()).await.expect("reaches the worker");
        let addr = workers[i].addr.clone();
        wait_for("each cut rank to serve the new replica or unload", LIMIT, || {
            let (mut w, url, addr) = (w.clone(), url.clone(), addr.clone());
            async move { serving(&url).await.contains(&addr) || w.health(wpb::HealthRequest {}).await.is_ok_and(|h| h.into_inner().weight_bytes == 0) }
        })
        .await;
    }
    let settled = cut.elapsed();

    // Healed, the two link again: with the third worker gone, the only replica left to
    // place is theirs.
    hosts[a].heal(&hosts[b]);
    workers[spare].kill();
    let killed = Instant::now();
    let mut both = vec![workers[a].addr.clone(), workers[b].addr.clone()];
    both.sort();
    wait_for("the healed pair to serve", LIMIT, || async {
        let mut serving = serving(&url).await;
        serving.sort();
        serving == both && replicas(&c).await == 1
    })
    .await;
    all_complete(streams(&c, MAX_TOKENS), &solo).await;
    let relinked = killed.elapsed();
    eprintln!(
        "(b) the link between the two ranks of a TP-2 replica cut under 16 × {MAX_TOKENS} tokens (--comm-timeout-secs 3): \
         all complete {completed:?} after the cut, 0 lost, token-exact; both ranks settled {settled:?} after it; \
         healed and the spare killed, the pair serves again and 16 more complete {relinked:?} after the kill"
    );
}

#[tokio::test]
async fn etcd_partitioned_from_everyone_past_the_lease_ttl_loses_nothing() {
    let _one = SERIAL.lock().await;
    let Some(net) = network() else { return };
    let TwoWorkers { _net, etcd_host, coordinator_host, h1, h2, etcd: _etcd, w1: _w1, w2: _w2, coordinator: _coordinator, url, c, solo, epoch } =
        two_workers(net).await;

    // etcd vanishes for everyone for more than twice the lease TTL: every lease (the workers'
    // cards, the leader key) expires on etcd while the cluster cannot hear of it.
    let load = streams(&c, MAX_TOKENS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for h in [&coordinator_host, &h1, &h2] {
        h.cut(&etcd_host);
    }
    let cut = Instant::now();
    let ttl: u64 = TTL_SECS.parse().expect("seconds");
    tokio::time::sleep(Duration::from_secs(2 * ttl + 1)).await;
    for h in [&coordinator_host, &h1, &h2] {
        h.heal(&etcd_host);
    }
    let healed = Instant::now();
    all_complete(load, &solo).await;
    let completed = cut.elapsed();

    // Past the time a worker that did not register again would be given up (two TTLs) and
    // a leader that could not lead again would stop, nothing moved: the same placement epoch,
    // both workers serving, the same coordinator leading, and it serves on.
    tokio::time::sleep(Duration::from_secs(3 * ttl + 1)).await;
    let after = status(url.clone()).await;
    assert!(after.leader, "the coordinator leads again");
    assert_eq!(after.epoch, epoch, "the placement did not change");
    assert_eq!(serving(&url).await.len(), 2);
    all_complete(streams(&c, MAX_TOKENS), &solo).await;
    eprintln!(
        "(d) etcd cut from the coordinator and both workers for {:?} (lease TTL {TTL_SECS} s) under 16 × {MAX_TOKENS} tokens: \
         all complete {completed:?} after the cut, 0 lost, token-exact; {:?} after the heal the same leader leads, placement epoch {epoch} \
         unchanged, both workers serving, and 16 more complete",
        healed - cut,
        healed.elapsed(),
    );
}
