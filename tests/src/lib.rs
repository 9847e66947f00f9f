//! Shared helpers for end-to-end tests: the project's binaries, child processes that are
//! killed when dropped, and the fixtures.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// The cargo target directory holding this test's build.
pub fn target_dir() -> PathBuf {
    // target/<profile>/deps/<test executable>
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors().nth(3).expect("target/<profile>/deps/<exe>").to_owned()
}

/// Path of one of the workspace's binaries, built (once per test process, in the test's own
/// profile) if needed.
pub fn binary(name: &str) -> PathBuf {
    // tests/target/<profile>/deps/<test> -> <profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_owned();
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "worker", "-p", "coordinator", "--bins"]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.current_dir(repo_root()).status().expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
    });
    profile_dir.join(name)
}

/// A child process that printed `listening on ADDR` (after any other lines); stopped on drop
/// with SIGTERM (so a `tramctl up` stops its own children), then SIGKILL.
pub struct Server {
    pub child: Child,
    pub addr: String,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Server {
    pub fn start(binary_name: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(binary(binary_name));
        cmd.args(args);
        Self::spawn(binary_name, cmd)
    }

    /// [`Server::start`] of a prepared command (environment, arguments).
    pub fn spawn(binary_name: &str, mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap_or_else(|e| panic!("{binary_name} starts: {e}"));
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let addr = loop {
            let mut line = String::new();
            let n = stdout.read_line(&mut line).expect("reads stdout");
            assert!(n > 0, "{binary_name} exited before printing its address");
            if let Some(addr) = line.trim().strip_prefix("listening on ") {
                break addr.to_owned();
            }
        };
        Server { child, addr, stdout }
    }

    /// The next line the process prints on stdout.
    pub fn next_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reads a line");
        line.trim().to_owned()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `kill -9`, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw HTTP/1.1 exchange with `addr`: the response, head and body, until the server
/// closes; empty when nothing answers.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let _ =
        write!(s, "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Waits until the coordinator whose HTTP API is at `addr` is ready (`/health` 200), as a
/// load balancer's readiness probe would.
pub fn wait_ready(addr: &str, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while !http(addr, "GET", "/health", "").starts_with("HTTP/1.1 200") {
        assert!(std::time::Instant::now() < deadline, "the coordinator at {addr} was not ready within {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The `etcd` binary; Debian's `etcd-server` is installed when it is missing (root, or
/// sudo without a password), otherwise the test stops with what to install.
pub fn etcd_binary() -> PathBuf {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let which = || {
                Command::new("sh")
                    .args(["-c", "command -v etcd"])
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            };
            if let Some(p) = which() {
                return p;
            }
            let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
            let sudo = if root { "" } else { "sudo -n " };
            let script = format!("{sudo}apt-get update -qq && DEBIAN_FRONTEND=noninteractive {sudo}apt-get install -y -qq --no-install-recommends etcd-server");
            let _ = Command::new("sh").args(["-c", &script]).status();
            which().expect("etcd is not installed and could not be installed: install Debian's etcd-server")
        })
        .clone()
}

/// `program` run on `host`, or here without one; and the address it listens on there.
pub fn on<'a>(host: Option<&'a net::Host>, program: &Path) -> (Command, &'a str) {
    match host {
        Some(h) => (h.command(program), h.ip.as_str()),
        None => (Command::new(program), "127.0.0.1"),
    }
}

/// A TCP port free on the loopback interface now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A real single-member etcd on loopback ports of its own, with a fast election so short
/// lease TTLs are granted; killed on drop. `stop` and `start` keep its data.
pub struct Etcd {
    child: Option<Child>,
    data: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// The host it runs on (see [`net`]); `None`: this one, on loopback.
    host: Option<net::Host>,
    /// Client TLS with client-certificate auth: (CA, certificate, key) files, and the plain
    /// port its health is read on.
    tls: Option<(::cluster::tls::ClusterTlsArgs, u16)>,
}

impl Etcd {
    pub fn start() -> Self {
        let mut etcd = Etcd::unstarted();
        etcd.resume();
        etcd
    }

    /// Ports and a data directory of its own, not started yet ([`Etcd::resume`] starts it):
    /// for processes that start before etcd answers.
    pub fn unstarted() -> Self {
        let data = std::env::temp_dir().join(format!("tramontane-etcd-{}-{}", std::process::id(), free_port()));
        Etcd { child: None, data, client_port: free_port(), peer_port: free_port(), host: None, tls: None }
    }

    /// A started etcd whose clients must present a certificate the CA of `files` signed
    /// (`https://` URL; `files` name etcd's own certificate, for 127.0.0.1).
    pub fn with_client_certificates(files: ::cluster::tls::ClusterTlsArgs) -> Self {
        let mut etcd = Etcd::unstarted();
        etcd.tls = Some((files, free_port()));
        etcd.resume();
        etcd
    }

    /// A started etcd on a host of its own.
    pub fn on(host: &net::Host) -> Self {
        let mut etcd = Etcd::unstarted();
        etcd.host = Some(host.clone());
        etcd.resume();
        etcd
    }

    fn ip(&self) -> &str {
        self.host.as_ref().map_or("127.0.0.1", |h| h.ip.as_str())
    }

    pub fn url(&self) -> String {
        format!("{}://{}:{}", if self.tls.is_some() { "https" } else { "http" }, self.ip(), self.client_port)
    }

    /// Starts it again (after `stop`) on the same ports and data.
    pub fn resume(&mut self) {
        let (client, peer) = (self.url(), format!("http://{}:{}", self.ip(), self.peer_port));
        let (mut etcd, _) = on(self.host.as_ref(), &etcd_binary());
        let child = etcd
            .args(["--name", "t", "--data-dir", &self.data.display().to_string()])
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}"), "--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(self.tls.iter().flat_map(|(files, metrics)| {
                let path = |p: &Option<PathBuf>| p.as_ref().expect("every file").display().to_string();
                [
                    "--client-cert-auth".to_owned(),
                    "--trusted-ca-file".to_owned(),
                    path(&files.cluster_ca),
                    "--cert-file".to_owned(),
                    path(&files.cluster_cert),
                    "--key-file".to_owned(),
                    path(&files.cluster_key),
                    "--listen-metrics-urls".to_owned(),
                    format!("http://{}:{metrics}", self.ip()),
                ]
            }))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log()).expect("etcd's log file"))
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        // Generous: on a loaded two-core machine a debug test run can keep etcd from its
        // first fsyncs for seconds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.healthy() {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            let log = || std::fs::read_to_string(self.log()).unwrap_or_default();
            if let Some(status) = exited {
                panic!("etcd exited ({status}) before it became healthy:\n{}", log());
            }
            assert!(std::time::Instant::now() < deadline, "etcd did not become healthy within 60 s:\n{}", log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// etcd's standard error (the latest run's).
    fn log(&self) -> PathBuf {
        self.data.with_extension("log")
    }

    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let port = self.tls.as_ref().map_or(self.client_port, |(_, metrics)| *metrics);
        let Ok(mut s) = std::net::TcpStream::connect((self.ip(), port)) else { return false };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(1)));
        let _ = write!(s, "GET /health HTTP/1.0\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Stops etcd (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_file(self.log());
    }
}

pub mod kube;
pub mod net;

/// A coordinator over fixed worker processes started here (no etcd).
pub mod fixed {
    use crate::{Server, fixture};

    pub struct Cluster {
        pub workers: Vec<Server>,
        pub coordinator: Server,
        /// The HTTP API's address.
        pub http: String,
    }

    impl Cluster {
        pub fn worker_addrs(&self) -> Vec<String> {
            self.workers.iter().map(|w| w.addr.clone()).collect()
        }
    }

    pub fn start(model: &str, workers: usize) -> Cluster {
        start_with(model, workers, &[])
    }

    /// `workers` workers and a coordinator of the fixture `model` (64 KV blocks a worker, 16
    /// tokens a step, and `extra` flags), once it serves.
    pub fn start_with(model: &str, workers: usize, extra: &[&str]) -> Cluster {
        let workers: Vec<Server> = (0..workers).map(|_| Server::start("worker", &["serve", "--listen", "127.0.0.1:0"])).collect();
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        let model = fixture(model).display().to_string();
        let fixed = ["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--model", &model, "--worker", &addrs.join(",")];
        let limits = ["--kv-blocks", "64", "--max-batch-tokens", "16"];
        let args: Vec<&str> = fixed.into_iter().chain(limits).chain(extra.iter().copied()).collect();
        let mut coordinator = Server::start("coordinator", &args);
        let http = coordinator.next_line().strip_prefix("http listening on ").expect("the HTTP address").to_owned();
        // The APIs are up at once; the model is served once the workers loaded it.
        crate::wait_ready(&http, std::time::Duration::from_secs(300));
        Cluster { workers, coordinator, http }
    }
}

/// Client-side helpers over the coordinator's gRPC API.
pub mod client {
    use pb::inference_client::InferenceClient;
    use proto::tramontane::v1 as pb;
    use tonic::transport::Channel;

    pub async fn inference(url: String) -> InferenceClient<Channel> {
        InferenceClient::connect(url).await.expect("connects to the coordinator")
    }

    pub async fn status(url: String) -> pb::ClusterStatusResponse {
        let mut admin = pb::admin_client::AdminClient::connect(url).await.expect("connects");
        admin.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner()
    }

    /// Streams a greedy generation of `max_tokens` from token ids to the end (with a repetition
    /// penalty, which, unlike presence and frequency penalties, treats prompt and output
    /// alike: a continuation from prompt + output is the same request); the token ids.
    pub async fn stream_ids(client: &mut InferenceClient<Channel>, prompt: &[u32], max_tokens: u32) -> Result<Vec<u32>, tonic::Status> {
        match stream_until_end(client, prompt, max_tokens).await {
            (ids, None) => Ok(ids),
            (_, Some(status)) => Err(status),
        }
    }

    /// [`stream_ids`], keeping the tokens that came before an error: the token ids, and the
    /// error if the stream did not finish.
    pub async fn stream_until_end(client: &mut InferenceClient<Channel>, prompt: &[u32], max_tokens: u32) -> (Vec<u32>, Option<tonic::Status>) {
        let req = pb::GenerateRequest {
            request_id: String::new(),
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt.to_vec() })),
            // A repetition penalty, so the tokens the workers keep for it must move with the
            // request; EOS ignored, so every stream runs its whole length.
            sampling: Some(pb::SamplingParams { max_tokens: Some(max_tokens), repetition_penalty: Some(1.3), ignore_eos: true, ..Default::default() }),
            cache_salt: None,
            constraint: None,
        };
        let mut ids = Vec::new();
        let mut stream = match client.generate(req).await {
            Ok(s) => s.into_inner(),
            Err(status) => return (ids, Some(status)),
        };
        loop {
            match stream.message().await {
                Ok(Some(msg)) => ids.extend(msg.token_ids),
                Ok(None) => return (ids, None),
                Err(status) => return (ids, Some(status)),
            }
        }
    }

    /// The addresses of the workers the coordinator at `url` reports serving.
    pub async fn serving(url: &str) -> Vec<String> {
        status(url.to_owned()).await.workers.into_iter().filter(|w| w.state == "serving").map(|w| w.address).collect()
    }

    /// Polls `check` every 50 ms until it holds; the time it took. Panics after `limit`.
    pub async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, limit: std::time::Duration, mut check: impl FnMut() -> F) -> std::time::Duration {
        let started = std::time::Instant::now();
        while !check().await {
            assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        started.elapsed()
    }
}

/// Sixteen concurrent greedy streams against a cluster, and their checks.
pub mod load {
    use pb::inference_client::InferenceClient;
    use proto::tramontane::v1 as pb;
    use tokio::task::JoinHandle;
    use tonic::transport::Channel;

    use crate::client::stream_ids;

    pub type Streams = Vec<JoinHandle<Result<Vec<u32>, tonic::Status>>>;

    /// Sixteen prompts of 3 to 7 token ids.
    pub fn prompts() -> Vec<Vec<u32>> {
        (0..16u32).map(|i| (0..(3 + i % 5)).map(|j| 200 + 41 * i + j).collect()).collect()
    }

    /// One stream of `max_tokens` per prompt, all at once.
    pub fn streams(c: &InferenceClient<Channel>, max_tokens: u32) -> Streams {
        prompts()
            .into_iter()
            .map(|p| {
                let mut c = c.clone();
                tokio::spawn(async move { stream_ids(&mut c, &p, max_tokens).await })
            })
            .collect()
    }

    /// Each prompt's greedy tokens on the undisturbed cluster (a row's result does not depend
    /// on its batch, so these are also what each prompt produces alone).
    pub async fn solo(c: &InferenceClient<Channel>, max_tokens: u32) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        for s in streams(c, max_tokens) {
            let ids = s.await.expect("joins").expect("undisturbed generation");
            assert_eq!(ids.len(), max_tokens as usize, "the undisturbed run generates every token");
            out.push(ids);
        }
        out
    }

    /// Every stream completed, with its solo tokens; returns when the last one ended.
    pub async fn all_complete(streams: Streams, solo: &[Vec<u32>]) {
        let mut failed = 0;
        assert_eq!(streams.len(), solo.len());
        for (i, s) in streams.into_iter().enumerate() {
            match s.await.expect("joins") {
                Ok(ids) => assert_eq!(ids, solo[i], "request {i}: the tokens differ from its solo run"),
                Err(status) => {
                    eprintln!("request {i} failed: {status:?}");
                    failed += 1;
                }
            }
        }
        assert_eq!(failed, 0, "requests lost");
    }

    /// The cluster's replica count (0 while it cannot answer).
    pub async fn replicas(c: &InferenceClient<Channel>) -> u32 {
        c.clone().model_info(pb::ModelInfoRequest {}).await.map_or(0, |i| i.into_inner().replicas)
    }
}

/// Workers and coordinators on an etcd, with short leases.
pub mod cluster {
    use crate::net::Host;
    use crate::{Etcd, Server, binary, fixture, on};

    /// Seconds a registration or leadership outlives its holder.
    pub const TTL_SECS: &str = "2";

    pub fn worker(etcd: &Etcd) -> Server {
        worker_on(None, etcd)
    }

    /// A worker on `host` (here, on loopback, without one).
    pub fn worker_on(host: Option<&Host>, etcd: &Etcd) -> Server {
        worker_with(host, etcd, &[])
    }

    /// [`worker_on`] with `extra` flags.
    pub fn worker_with(host: Option<&Host>, etcd: &Etcd, extra: &[&str]) -> Server {
        let (mut cmd, ip) = on(host, &binary("worker"));
        cmd.args(["serve", "--listen", &format!("{ip}:0"), "--etcd", &etcd.url(), "--cluster", "t", "--lease-ttl-secs", TTL_SECS]).args(extra);
        Server::spawn("worker", cmd)
    }

    /// A coordinator of the tiny Mistral fixture (128 KV blocks, 4 sequences a step), once
    /// both its APIs listen; `.addr` is the gRPC one, the returned string the HTTP one.
    pub fn coordinator_with_http(etcd: &Etcd, extra: &[&str]) -> (Server, String) {
        coordinator_on(None, etcd, extra)
    }

    /// [`coordinator_with_http`] on `host` (here, on loopback, without one).
    pub fn coordinator_on(host: Option<&Host>, etcd: &Etcd, extra: &[&str]) -> (Server, String) {
        coordinator_of(host, etcd, "mistral-v1-tiny", extra)
    }

    /// [`coordinator_on`] of the fixture `model`.
    pub fn coordinator_of(host: Option<&Host>, etcd: &Etcd, model: &str, extra: &[&str]) -> (Server, String) {
        let (mut cmd, ip) = on(host, &binary("coordinator"));
        let (any, url, model) = (format!("{ip}:0"), etcd.url(), fixture(model).display().to_string());
        cmd.args(["--grpc-addr", &any, "--http-addr", &any, "--model", &model]);
        cmd.args(["--etcd", &url, "--cluster", "t", "--lease-ttl-secs", TTL_SECS, "--kv-blocks", "128", "--max-num-seqs", "4"]).args(extra);
        let mut c = Server::spawn("coordinator", cmd);
        let http = c.next_line().strip_prefix("http listening on ").expect("the HTTP address").to_owned();
        (c, http)
    }

    pub fn coordinator(etcd: &Etcd, extra: &[&str]) -> Server {
        coordinator_with_http(etcd, extra).0
    }
}
