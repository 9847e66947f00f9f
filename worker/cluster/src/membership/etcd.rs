//! Membership on etcd (etcd-client): leases with keep-alive, a prefix watch that restarts
//! with a fresh snapshot after an outage, leadership by a transaction on the `leader` key,
//! and plan writes guarded by that key.

use std::time::{Duration, Instant};

use crate::tls::ClusterTls;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Leadership, Lease, MemberEvent, Membership, MembershipError, WorkerCard};

/// Pause between attempts while etcd is unreachable or the leader key is held.
const RETRY: Duration = Duration::from_millis(250);

/// Capped exponential backoff: 250 ms, doubling, at most 5 s between attempts.
struct Backoff(Duration);

impl Backoff {
    const CAP: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Backoff(RETRY)
    }

    /// The wait before the next attempt.
    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Self::CAP);
        wait
    }
}

fn store(e: etcd_client::Error) -> MembershipError {
    MembershipError::Store(e.to_string())
}

#[derive(Clone)]
pub struct EtcdMembership {
    client: Client,
    /// The endpoints, for the log lines of a process waiting for etcd.
    endpoints: Vec<String>,
    /// `/tramontane/{cluster}/`
    prefix: String,
    ttl: Duration,
}

impl std::fmt::Debug for EtcdMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMembership").field("prefix", &self.prefix).field("ttl", &self.ttl).finish()
    }
}

/// How a kept-alive lease ended.
enum Ended {
    Stopped,
    Lost,
}

impl EtcdMembership {
    /// Connects to the etcd `endpoints` for cluster `cluster`; leases last `ttl`. With `tls`,
    /// over TLS presenting the cluster certificate (`https://` endpoints; a bare `host:port` is
    /// taken as one).
    pub async fn connect(endpoints: &[String], cluster: &str, ttl: Duration, tls: Option<&ClusterTls>) -> Result<Self, MembershipError> {
        if cluster.is_empty() || cluster.contains('/') {
            return Err(MembershipError::Invalid(format!("cluster name {cluster:?} must be non-empty, without '/'")));
        }
        let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(2));
        if let Some(tls) = tls {
            if let Some(plain) = endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(MembershipError::Invalid(format!("etcd endpoint {plain}: the cluster CA is given, so etcd is reached over TLS (https://)")));
            }
            options = options.with_tls(tls.etcd());
        }
        let client = Client::connect(endpoints, Some(options)).await.map_err(store)?;
        Ok(EtcdMembership { client, endpoints: endpoints.to_vec(), prefix: format!("/tramontane/{cluster}/"), ttl })
    }

    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    fn ttl_secs(&self) -> i64 {
        self.ttl.as_secs().max(1) as i64
    }

    /// Keeps lease `id` alive until `stop` (then revokes it) or until etcd says it is gone,
    /// moving `until` on with every answer. While etcd is unreachable it keeps trying: the
    /// lease may well outlive the outage.
    async fn keep(&self, id: i64, stop: &CancellationToken, until: &watch::Sender<Instant>) -> Ended {
        let mut client = self.client.clone();
        let period = self.ttl / 3;
        loop {
            let (mut keeper, mut stream) = match client.lease_keep_alive(id).await {
                Ok(pair) => pair,
                // Opening reads etcd's first answer: an expired lease (as after a partition
                // longer than the TTL) is an error here, not a TTL-0 answer below.
                Err(e) if lease_is_gone(&e) => return Ended::Lost,
                Err(_) => {
                    tokio::select! {
                        _ = stop.cancelled() => return Ended::Stopped,
                        _ = tokio::time::sleep(RETRY) => continue,
                    }
                }
            };
            loop {
                let sent = Instant::now();
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(self.ttl, stream.message()).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                        until.send_replace(sent + Duration::from_secs(resp.ttl() as u64));
                    }
                    Ok(Ok(Some(_))) => return Ended::Lost,
                    _ => break,
                }
                tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = client.lease_revoke(id).await;
                        return Ended::Stopped;
                    }
                    _ = tokio::time::sleep(period) => {}
                }
            }
        }
    }

    /// Puts `card` under a fresh lease, retrying with capped exponential backoff while etcd
    /// is unreachable (a worker may start before etcd answers: it serves meanwhile and joins
    /// when etcd does); `None` once `stop` is cancelled.
    async fn put_card_until_done(&self, card: &WorkerCard, stop: &CancellationToken) -> Option<i64> {
        let mut backoff = Backoff::new();
        loop {
            match self.put_card(card).await {
                Ok(lease) => return Some(lease),
                Err(e) => {
                    let wait = backoff.next();
                    tracing::warn!(worker = %card.id, endpoints = ?self.endpoints, error = %e, retry_in = ?wait, "cannot register on etcd yet");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn put_card(&self, card: &WorkerCard) -> Result<i64, MembershipError> {
        let mut client = self.client.clone();
        let lease = client.lease_grant(self.ttl_secs(), None).await.map_err(store)?.id();
        let json = serde_json::to_string(card).map_err(|e| MembershipError::Invalid(e.to_string()))?;
        client.put(self.key(&format!("workers/{}", card.id)), json, Some(PutOptions::new().with_lease(lease))).await.map_err(store)?;
        Ok(lease)
    }

    /// Sends a snapshot of the cards, then their changes, until the watch fails.
    async fn snapshot_and_watch(&self, tx: &mpsc::UnboundedSender<MemberEvent>) -> Result<(), MembershipError> {
        let mut client = self.client.clone();
        let prefix = self.key("workers/");
        let resp = client.get(prefix.clone(), Some(GetOptions::new().with_prefix())).await.map_err(store)?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let cards = resp.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect();
        if tx.send(MemberEvent::Snapshot(cards)).is_err() {
            return Ok(());
        }
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = client.watch(prefix.clone(), Some(options)).await.map_err(store)?;
        while let Some(resp) = stream.message().await.map_err(store)? {
            if resp.canceled() {
                return Err(MembershipError::Store(format!("watch canceled: {}", resp.cancel_reason())));
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let sent = match event.event_type() {
                    EventType::Put => match serde_json::from_slice::<WorkerCard>(kv.value()) {
                        Ok(card) => tx.send(MemberEvent::Up(card)),
                        Err(_) => Ok(()),
                    },
                    EventType::Delete => {
                        let id = String::from_utf8_lossy(kv.key()).trim_start_matches(prefix.as_str()).to_owned();
                        tx.send(MemberEvent::Down(id))
                    }
                };
                if sent.is_err() {
                    return Ok(());
                }
            }
        }
        Err(MembershipError::Store("the watch ended".into()))
    }
}

/// Whether opening a keep-alive failed because etcd no longer has the lease (etcd-client
/// turns a first answer of TTL 0 into this error).
fn lease_is_gone(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::LeaseKeepAliveError(m) if m == "lease not found")
}

/// A lease kept by the task `keep` makes, given the tokens it cancels when the lease is
/// lost and watches for its holder's stop, and where it records until when the lease holds
/// (at first: `granted`, when the grant was asked for, plus `ttl`); the lease has ended when
/// that task returns.
fn kept<F: std::future::Future<Output = ()> + Send + 'static>(
    granted: Instant,
    ttl: Duration,
    keep: impl FnOnce(CancellationToken, CancellationToken, watch::Sender<Instant>) -> F,
) -> Lease {
    let (lost, stop, ended) = (CancellationToken::new(), CancellationToken::new(), CancellationToken::new());
    let (until_tx, until) = watch::channel(granted + ttl);
    let task = keep(lost.clone(), stop.clone(), until_tx);
    let ended_guard = ended.clone().drop_guard();
    tokio::spawn(async move {
        let _ended = ended_guard;
        task.await
    });
    Lease::new(lost, stop, ended, until)
}

#[tonic::async_trait]
impl Membership for EtcdMembership {
    async fn register(&self, card: &WorkerCard) -> Result<Lease, MembershipError> {
        let (me, card) = (self.clone(), card.clone());
        Ok(kept(Instant::now(), self.ttl, |lost, stop, until| async move {
            loop {
                let Some(lease) = me.put_card_until_done(&card, &stop).await else { return };
                tracing::info!(worker = %card.id, endpoints = ?me.endpoints, "registered on etcd");
                if let Ended::Stopped = me.keep(lease, &stop, &until).await {
                    return;
                }
                tracing::warn!(worker = %card.id, "the registration's lease is gone; registering again");
                lost.cancel();
            }
        }))
    }

    fn watch_workers(&self) -> mpsc::UnboundedReceiver<MemberEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = self.clone();
        tokio::spawn(async move {
            while !tx.is_closed() {
                if let Err(e) = me.snapshot_and_watch(&tx).await {
                    tracing::debug!(error = %e, "membership watch interrupted; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        });
        rx
    }

    async fn campaign(&self, id: &str) -> Result<Leadership, MembershipError> {
        let mut client = self.client.clone();
        let key = self.key("leader");
        loop {
            let held = match client.get(key.clone(), None).await {
                Ok(resp) => !resp.kvs().is_empty(),
                Err(_) => true,
            };
            let asked = Instant::now();
            if !held && let Ok(grant) = client.lease_grant(self.ttl_secs(), None).await {
                let lease = grant.id();
                let txn = Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
                    key.clone(),
                    id,
                    Some(PutOptions::new().with_lease(lease)),
                )]);
                match client.txn(txn).await {
                    Ok(resp) if resp.succeeded() => {
                        let me = self.clone();
                        let kept = kept(asked, self.ttl, |lost, stop, until| async move {
                            if let Ended::Lost = me.keep(lease, &stop, &until).await {
                                lost.cancel();
                            }
                        });
                        return Ok(Leadership { id: id.to_owned(), lease: kept });
                    }
                    _ => {
                        let _ = client.lease_revoke(lease).await;
                    }
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn load_plan(&self) -> Result<Option<String>, MembershipError> {
        let resp = self.client.clone().get(self.key("plan"), None).await.map_err(store)?;
        Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn store_plan(&self, plan: &str, leader: &str) -> Result<(), MembershipError> {
        let txn = Txn::new().when([Compare::value(self.key("leader"), CompareOp::Equal, leader)]).and_then([TxnOp::put(self.key("plan"), plan, None)]);
        let resp = self.client.clone().txn(txn).await.map_err(store)?;
        if !resp.succeeded() {
            return Err(MembershipError::NotLeader(format!("{leader} no longer holds the leader key")));
        }
        Ok(())
    }
}
