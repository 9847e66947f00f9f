//! Mutual TLS inside the cluster, with real processes: `tramctl up` with the cluster's
//! certificates over an etcd that requires client certificates serves a TP-2 replica (its
//! ranks linked over TLS) with the tokens of a plain-text cluster; a worker whose certificate
//! another CA signed, or one without any, cannot register; the worker API refuses a client
//! without the cluster's certificate and the coordinator's side refuses a worker without one;
//! a process dialing a rank's links while its replica forms never joins the mesh.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use cluster::tls::{Authority, ClusterTls, ClusterTlsArgs};
use proto::tramontane::worker::v1 as wpb;
use tests::client::{inference, status, wait_for};
use tests::load::{all_complete, replicas, solo, streams};
use tests::{Etcd, Server, fixture, free_port};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MAX_TOKENS: u32 = 48;
const LIMIT: Duration = Duration::from_secs(120);

/// The cluster files of a certificate `ca` issues to `name`, in a directory of its own.
fn issue(ca: &Authority, dir: &Path, name: &str, hosts: &[&str]) -> ClusterTlsArgs {
    let own = dir.join(name);
    std::fs::create_dir_all(&own).expect("a directory for the certificate");
    ca.write(&own, name, hosts).expect("the certificate's files")
}

/// `cert`'s certificate and key, trusting `ca`'s CA.
fn identity(ca: &ClusterTlsArgs, cert: &ClusterTlsArgs) -> ClusterTls {
    let read = |p: &Option<std::path::PathBuf>| std::fs::read(p.as_ref().expect("a file")).expect("reads");
    ClusterTls::from_pem(read(&ca.cluster_ca), read(&cert.cluster_cert), read(&cert.cluster_key)).expect("loads")
}

fn tramctl_up(extra: &[String]) -> Server {
    let mut args: Vec<String> = ["up", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--kv-blocks", "256"].map(String::from).to_vec();
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = Server::start("tramctl", &args);
    assert!(up.next_line().starts_with("http listening on "));
    up
}

/// The worker at `addr`'s Health, called with `tls` (plain text without).
async fn health(addr: &str, tls: Option<&ClusterTls>) -> Result<wpb::HealthResponse, String> {
    let url = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
    let mut endpoint = tonic::transport::Endpoint::from_shared(url).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.grpc_client()).map_err(|e| e.to_string())?;
    }
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
        let mut c = wpb::worker_client::WorkerClient::new(channel);
        c.health(wpb::HealthRequest {}).await.map(tonic::Response::into_inner).map_err(|s| s.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), call).await.unwrap_or_else(|_| Err("no answer in 5 s".into()))
}

fn worker(etcd_url: &str, tls: &[String]) -> Server {
    let mut args: Vec<String> = ["serve", "--listen", "127.0.0.1:0", "--etcd", etcd_url, "--cluster", "default"].map(String::from).to_vec();
    args.extend(tls.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start("worker", &args)
}

#[tokio::test]
async fn a_cluster_under_mutual_tls_serves_and_refuses_what_its_ca_did_not_sign() {
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (ca, other) = (Authority::new("cluster CA").unwrap(), Authority::new("another CA").unwrap());
    let member = issue(&ca, dir.path(), "member", &[]);
    let stranger = issue(&other, dir.path(), "stranger", &["127.0.0.1"]);
    let etcd = Etcd::with_client_certificates(issue(&ca, dir.path(), "etcd", &["127.0.0.1", "localhost"]));

    // Accepted: the cluster's processes, each with a certificate of the CA.
    let flags = [vec!["--etcd".to_owned(), etcd.url(), "--workers".into(), "2".into(), "--tp".into(), "2".into()], member.to_args()].concat();
    let up = tramctl_up(&flags);
    let c = inference(up.url()).await;
    wait_for("a TP-2 replica over mutual TLS", LIMIT, || async { replicas(&c).await == 1 }).await;
    let tls_solo = solo(&c, MAX_TOKENS).await;
    all_complete(streams(&c, MAX_TOKENS), &tls_solo).await;
    {
        let plain = tramctl_up(&["--workers", "2", "--tp", "2"].map(String::from));
        let p = inference(plain.url()).await;
        wait_for("a plain-text TP-2 replica", LIMIT, || async { replicas(&p).await == 1 }).await;
        assert_eq!(solo(&p, MAX_TOKENS).await, tls_solo, "TLS changes no token");
    }

    // Refused by etcd: a worker with a certificate another CA signed, and one with none.
    let (rogue, bare) = (worker(&etcd.url(), &stranger.to_args()), worker(&etcd.url().replacen("https", "http", 1), &[]));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cluster = status(up.url()).await;
    let addresses: Vec<&str> = cluster.workers.iter().map(|w| w.address.as_str()).collect();
    assert_eq!(cluster.workers.len(), 2, "only the cluster's workers registered: {addresses:?}");
    assert!(!addresses.contains(&rogue.addr.as_str()) && !addresses.contains(&bare.addr.as_str()), "{addresses:?}");

    // The worker API answers the cluster's certificate only.
    let (ours, theirs) = (identity(&member, &member), identity(&member, &stranger));
    let served = health(addresses[0], Some(&ours)).await.expect("a member reaches the worker API");
    assert!(served.epoch >= 1, "{served:?}");
    for (who, tls) in [("another CA's certificate", Some(&theirs)), ("plain text", None)] {
        let refused = health(addresses[0], tls).await;
        assert!(refused.is_err(), "{who}: the worker API answered: {refused:?}");
    }
    // And the coordinator's side refuses a worker without the cluster's certificate: no
    // assignment can reach it.
    let refused = health(&rogue.addr, Some(&ours)).await;
    assert!(refused.is_err(), "a worker with another CA's certificate answered a member: {refused:?}");
    eprintln!("mutual TLS: TP-2 over etcd with client certificates, 16 × {MAX_TOKENS} tokens as plain text; 2 strangers unregistered, 2 clients refused");
}

/// A process dials rank 0's links (claiming rank 1, for the first epochs) again and again
/// while a TP-2 replica of the fixed workers forms: with another CA's certificate, or plain
/// text, it never joins, and the replica forms and serves.
#[tokio::test]
async fn a_process_without_the_cluster_certificate_cannot_join_a_replica_s_mesh() {
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (ca, other) = (Authority::new("cluster CA").unwrap(), Authority::new("another CA").unwrap());
    let member = issue(&ca, dir.path(), "member", &[]).to_args();
    let stranger = issue(&other, dir.path(), "stranger", &[]);
    let rank0_links = format!("127.0.0.1:{}", free_port());

    let (attempts, joined, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let intruder = {
        let (attempts, joined, stop, target) = (attempts.clone(), joined.clone(), stop.clone(), rank0_links.clone());
        let theirs = ClusterTls::load(&stranger).expect("loads").expect("every file given");
        std::thread::spawn(move || {
            let options = worker::comm::TcpOptions { timeout: Duration::from_secs(1), setup_timeout: Duration::from_millis(200) };
            while !stop.load(Ordering::Relaxed) {
                for (epoch, tls) in (1..=3).flat_map(|e| [(e, Some(theirs.clone())), (e, None)]) {
                    let own = worker::comm::CommListener::bind("127.0.0.1:0".parse().unwrap()).expect("binds").with_tls(tls);
                    let peers = [target.clone(), own.local_addr().expect("bound").to_string()];
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if worker::comm::TcpComm::connect(&own, epoch, 1, &peers, options).is_ok() {
                        joined.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let start = |links: Option<&str>| {
        let mut args = vec!["serve".to_owned(), "--listen".into(), "127.0.0.1:0".into()];
        if let Some(links) = links {
            args.extend(["--comm-listen".to_owned(), links.to_owned()]);
        }
        args.extend(member.iter().cloned());
        Server::start("worker", &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (w0, w1) = (start(Some(&rank0_links)), start(None));
    let model = fixture("mistral-v1-tiny").display().to_string();
    let workers = format!("{},{}", w0.addr, w1.addr);
    let mut args = vec!["--model", &model, "--worker", &workers, "--tp", "2", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--kv-blocks", "256"];
    args.extend(member.iter().map(String::as_str));
    let coordinator = Server::start("coordinator", &args);
    let c = inference(coordinator.url()).await;
    wait_for("a TP-2 replica of the fixed workers", LIMIT, || async { replicas(&c).await == 1 }).await;
    let outputs = solo(&c, 16).await;
    stop.store(true, Ordering::Relaxed);
    intruder.join().expect("the intruder's thread");
    let (attempts, joined) = (attempts.load(Ordering::Relaxed), joined.load(Ordering::Relaxed));
    assert!(attempts > 0, "the intruder tried");
    assert_eq!(joined, 0, "a process without the cluster's certificate joined a mesh");
    assert!(outputs.iter().all(|o| o.len() == 16));
    eprintln!("mesh: {attempts} attempts to join rank 0's links without the cluster's certificate, none joined; the replica serves");
}
