//! Manifest replay: a rendered Kubernetes overlay run as the kubelet would run it, with no API
//! server. Each pod is a host of its own ([`crate::net`]: a network namespace with one
//! address) whose container is started with exactly the manifest's command, args and
//! environment (ConfigMap `envFrom`, downward-API fields filled with the pod's name and IP,
//! `$(VAR)` expanded), its volumes bind-mounted where the manifest mounts them (claims and
//! emptyDirs as directories of the pod's own; the image's files from the repository), and
//! the image's binaries on its PATH. Service names resolve, in every pod's `/etc/hosts`, to
//! the addresses of the Service's ready pods (every pod's where the Service publishes
//! not-ready addresses), and a StatefulSet pod's `NAME.SERVICE` to its own. Probes run as the
//! kubelet runs them: readiness gates the Service, a failed liveness or startup probe
//! restarts the container. Deleting a pod runs its `preStop`, then SIGTERM, then SIGKILL when
//! its grace period ends. Needs root (namespaces, mounts) and `kubectl` (kustomize).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::net::{Host, Net};
use crate::{binary, etcd_binary, repo_root};

/// The objects `kubectl kustomize` renders for `overlay` (a directory under deploy/k8s).
pub fn render(overlay: &str) -> Vec<Value> {
    let dir = repo_root().join("deploy/k8s").join(overlay);
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        // As for etcd: Debian's package, where this runs as root.
        let script = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client";
        let _ = Command::new("sh").args(["-c", script]).status();
    }
    let out = Command::new("kubectl").arg("kustomize").arg(&dir).output().expect("kubectl runs (Debian's kubernetes-client)");
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::from_value::<Value>(serde::Deserialize::deserialize(doc).expect("YAML")).expect("JSON-like"))
        .collect()
}

/// A probe as the manifest states it.
#[derive(Debug, Clone)]
struct Probe {
    spec: Value,
    period: Duration,
    failures: u32,
}

impl Probe {
    fn of(container: &Value, kind: &str) -> Option<Probe> {
        let spec = container.get(kind)?.clone();
        let period = Duration::from_secs(spec.get("periodSeconds").and_then(Value::as_u64).unwrap_or(10));
        let failures = spec.get("failureThreshold").and_then(Value::as_u64).unwrap_or(3) as u32;
        Some(Probe { spec, period, failures })
    }
}

/// One pod: its host, its container's process, and what the kubelet knows of it.
pub struct Pod {
    pub name: String,
    /// The workload it belongs to (`app` label).
    pub app: String,
    pub host: Host,
    container: Value,
    env: BTreeMap<String, String>,
    grace: Duration,
    child: Option<Child>,
    dirs: Vec<(PathBuf, String)>,
    log: PathBuf,
    pub started: bool,
    pub ready: bool,
    pub restarts: u32,
    failures: BTreeMap<&'static str, u32>,
    last: BTreeMap<&'static str, Instant>,
}

/// The replayed cluster: its objects, its pods, and the network they live on.
pub struct Cluster {
    objects: Vec<Value>,
    pub pods: Vec<Pod>,
    net: Net,
    /// The image's binaries (symlinks), first on every pod's PATH.
    bin: PathBuf,
    /// Per-pod directories (claims keep their data across a pod's re-creation).
    state: tempfile::TempDir,
    /// The next Deployment pod's suffix.
    serial: usize,
}

impl Cluster {
    /// Creates every workload's pods (not yet ready: see [`Cluster::tick`]).
    pub fn start(objects: Vec<Value>) -> Cluster {
        let net = Net::new().unwrap_or_else(|e| panic!("manifest replay needs network namespaces: {e}"));
        let state = tempfile::tempdir().expect("temp dir");
        let bin = state.path().join("bin");
        std::fs::create_dir_all(&bin).expect("bin dir");
        for name in ["worker", "coordinator", "tramctl"] {
            std::os::unix::fs::symlink(binary(name), bin.join(name)).expect("symlink");
        }
        std::os::unix::fs::symlink(etcd_binary(), bin.join("etcd")).expect("symlink");
        let mut c = Cluster { objects, pods: Vec::new(), net, bin, state, serial: 0 };
        for w in c.workloads() {
            let replicas = w["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
            c.scale(w["metadata"]["name"].as_str().expect("a name"), replicas);
        }
        c
    }

    fn workloads(&self) -> Vec<Value> {
        self.objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("StatefulSet" | "Deployment"))).cloned().collect()
    }

    fn object(&self, kind: &str, name: &str) -> &Value {
        self.objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name).unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
    }

    /// The manifests' objects of `kind`.
    pub fn objects(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    /// Pods of workload `name` (its `app` label), in creation order.
    pub fn pods_of(&self, app: &str) -> Vec<&Pod> {
        self.pods.iter().filter(|p| p.app == app).collect()
    }

    /// Sets workload `name`'s pod count: a StatefulSet adds the next ordinals or deletes the
    /// highest ones (Parallel: all at once), a Deployment adds fresh names or deletes the
    /// newest.
    pub fn scale(&mut self, name: &str, replicas: usize) {
        let w = self.workloads().into_iter().find(|w| w["metadata"]["name"] == name).unwrap_or_else(|| panic!("no workload {name}"));
        let app = w["spec"]["selector"]["matchLabels"]["app"].as_str().expect("an app label").to_owned();
        let stateful = w["kind"] == "StatefulSet";
        let have = self.pods_of(&app).len();
        for i in have..replicas {
            let pod = if stateful { format!("{name}-{i}") } else { self.fresh_name(name) };
            self.create(&w, &app, &pod);
        }
        let gone: Vec<String> = self.pods_of(&app).iter().skip(replicas).map(|p| p.name.clone()).collect();
        self.delete_all(&gone);
    }

    /// A pod of workload `w` named `name`, its container started.
    fn create(&mut self, w: &Value, app: &str, name: &str) {
        let spec = &w["spec"]["template"]["spec"];
        let containers = spec["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "one container a pod");
        let container = containers[0].clone();
        // A pod made again under the same name (a StatefulSet's) is a new host.
        self.serial += 1;
        let host = self.net.host(&format!("{name}-{}", self.serial));
        let mut env =
            BTreeMap::from([("PATH".to_owned(), format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin.display())), ("HOME".to_owned(), "/tmp".to_owned())]);
        for from in container["envFrom"].as_array().into_iter().flatten() {
            let cm = self.object("ConfigMap", from["configMapRef"]["name"].as_str().expect("a ConfigMap name"));
            for (k, v) in cm["data"].as_object().into_iter().flatten() {
                env.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
            }
        }
        for e in container["env"].as_array().into_iter().flatten() {
            let value = match (&e["value"], e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Value::String(v), _) => expand(v, &env),
                (_, Some("metadata.name")) => name.to_owned(),
                (_, Some("status.podIP")) => host.ip.clone(),
                (_, Some("metadata.namespace")) => "tramontane".to_owned(),
                other => panic!("unsupported env source {other:?}"),
            };
            env.insert(e["name"].as_str().expect("a name").to_owned(), value);
        }
        // Volumes: the pod's own directories (a claim's survives the pod), mounted as stated.
        let mut dirs = Vec::new();
        for m in container["volumeMounts"].as_array().into_iter().flatten() {
            let dir = self.state.path().join("volumes").join(name).join(m["name"].as_str().expect("a volume name"));
            std::fs::create_dir_all(&dir).expect("volume dir");
            dirs.push((dir, m["mountPath"].as_str().expect("a mount path").to_owned()));
        }
        // The image's files: the tiny model it ships.
        dirs.push((repo_root().join("tests/fixtures/mistral-v1-tiny"), "/opt/tramontane/models/mistral-v1-tiny".to_owned()));
        let grace = Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
        let log = self.state.path().join(format!("{name}.log"));
        let mut pod = Pod {
            name: name.to_owned(),
            app: app.to_owned(),
            host,
            container,
            env,
            grace,
            child: None,
            dirs,
            log,
            started: false,
            ready: false,
            restarts: 0,
            failures: BTreeMap::new(),
            last: BTreeMap::new(),
        };
        self.write_hosts_of(&pod);
        pod.run();
        self.pods.push(pod);
    }

    /// Deletes pods by name as the kubelet does: out of their Services at once, `preStop`,
    /// SIGTERM, SIGKILL at the end of the grace period; all of them at the same time.
    pub fn delete_all(&mut self, names: &[String]) {
        for p in self.pods.iter_mut().filter(|p| names.contains(&p.name)) {
            p.ready = false;
        }
        self.write_hosts();
        let mut pods: Vec<Pod> = Vec::new();
        let mut i = 0;
        while i < self.pods.len() {
            if names.contains(&self.pods[i].name) { pods.push(self.pods.remove(i)) } else { i += 1 }
        }
        std::thread::scope(|s| {
            for p in &mut pods {
                s.spawn(move || p.terminate());
            }
        });
        for p in &pods {
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&p.host.ns));
        }
    }

    /// Deletes one pod; its controller makes a new one (same name for a StatefulSet, a fresh
    /// one for a Deployment).
    pub fn delete(&mut self, name: &str) {
        let app = self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}")).app.clone();
        self.delete_all(&[name.to_owned()]);
        self.replace(&app, name);
    }

    /// A node lost under pod `name`: its process killed (SIGKILL, no `preStop`), the pod
    /// gone from its Services; its controller makes it again elsewhere.
    pub fn lose(&mut self, name: &str) {
        let i = self.pods.iter().position(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"));
        let mut pod = self.pods.remove(i);
        pod.kill();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&pod.host.ns));
        self.write_hosts();
        self.replace(&pod.app, name);
    }

    /// What the controller of `app`'s pods does when pod `name` is gone: a StatefulSet makes
    /// it again under its name, a Deployment makes a fresh one.
    fn replace(&mut self, app: &str, name: &str) {
        let w = self.workloads().into_iter().find(|w| w["spec"]["selector"]["matchLabels"]["app"] == app).expect("its workload");
        let fresh = if w["kind"] == "StatefulSet" { name.to_owned() } else { self.fresh_name(w["metadata"]["name"].as_str().expect("a name")) };
        self.create(&w, app, &fresh);
    }

    /// Pod `name`'s container hangs (SIGSTOP): it answers nothing, not even its probes.
    pub fn freeze(&mut self, name: &str) {
        let pod = self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"));
        let pid = pod.child.as_ref().expect("a running container").id();
        let _ = Command::new("kill").args(["-STOP", &pid.to_string()]).status();
    }

    /// How many times pod `name`'s container was restarted.
    pub fn restarts(&self, name: &str) -> u32 {
        self.pods.iter().find(|p| p.name == name).map_or(0, |p| p.restarts)
    }

    /// A Deployment pod's name: the Deployment's and a serial number.
    fn fresh_name(&mut self, deployment: &str) -> String {
        self.serial += 1;
        format!("{deployment}-{}", self.serial)
    }

    /// One round of the kubelet: runs the probes that are due, restarts what failed, and
    /// rewrites the Services' addresses when readiness changed.
    pub fn tick(&mut self) {
        let mut changed = false;
        for p in &mut self.pods {
            changed |= p.probe();
        }
        if changed {
            self.write_hosts();
        }
    }

    /// Ticks until `check` holds (panics after `limit`).
    pub fn wait(&mut self, what: &str, limit: Duration, mut check: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            self.tick();
            if check(self) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}\n{}", self.describe());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every pod ready.
    pub fn all_ready(&self) -> bool {
        self.pods.iter().all(|p| p.ready || p.app == "coordinator") && self.pods.iter().any(|p| p.app == "coordinator" && p.ready)
    }

    /// The address a client resolves Service `name` to (its first ready pod's), if any.
    pub fn service(&self, name: &str) -> Option<String> {
        self.endpoints(name).into_iter().next()
    }

    fn endpoints(&self, service: &str) -> Vec<String> {
        let svc = self.object("Service", service);
        let app = svc["spec"]["selector"]["app"].as_str().expect("a selector");
        let all = svc["spec"]["publishNotReadyAddresses"].as_bool().unwrap_or(false);
        self.pods.iter().filter(|p| p.app == app && (all || p.ready)).map(|p| p.host.ip.clone()).collect()
    }

    /// `/etc/hosts` of every pod (the file `ip netns exec` mounts there).
    fn hosts_file(&self) -> String {
        let mut out = String::from("127.0.0.1 localhost\n");
        for svc in self.objects("Service") {
            let name = svc["metadata"]["name"].as_str().expect("a name");
            for ip in self.endpoints(name) {
                out.push_str(&format!("{ip} {name} {name}.tramontane.svc.cluster.local\n"));
            }
        }
        for w in self.workloads().iter().filter(|w| w["kind"] == "StatefulSet") {
            let service = w["spec"]["serviceName"].as_str().unwrap_or_default();
            let app = w["spec"]["selector"]["matchLabels"]["app"].as_str().unwrap_or_default();
            for p in self.pods.iter().filter(|p| p.app == app) {
                out.push_str(&format!("{} {}.{service}\n", p.host.ip, p.name));
            }
        }
        out
    }

    fn write_hosts_of(&self, pod: &Pod) {
        let dir = PathBuf::from("/etc/netns").join(&pod.host.ns);
        std::fs::create_dir_all(&dir).expect("/etc/netns");
        let mut text = self.hosts_file();
        text.push_str(&format!("{} {}\n", pod.host.ip, pod.name));
        // Written in place: the mount inside the namespace is of this file's inode.
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dir.join("hosts"))
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("hosts");
    }

    fn write_hosts(&self) {
        for p in &self.pods {
            self.write_hosts_of(p);
        }
    }

    /// Each pod's state, and the end of its log.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for p in &self.pods {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            out.push_str(&format!("{} {} started {} ready {} restarts {}\n  {}\n", p.name, p.host.ip, p.started, p.ready, p.restarts, tail.join("\n  ")));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.pods {
            p.kill();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&p.host.ns));
        }
    }
}

/// `$(VAR)` replaced by the variable's value where it is defined (`$$` is a `$`), as the
/// kubelet expands command, args and env values.
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some((var, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')'))
            && let Some(v) = env.get(var)
        {
            out.push_str(v);
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out + rest
}

impl Pod {
    /// The container's command line: the manifest's command and args, expanded.
    fn argv(&self) -> Vec<String> {
        let strings = |v: &Value| v.as_array().into_iter().flatten().map(|s| expand(s.as_str().unwrap_or_default(), &self.env)).collect::<Vec<_>>();
        let mut argv = strings(&self.container["command"]);
        argv.extend(strings(&self.container["args"]));
        argv
    }

    /// `argv` run in the pod: its namespace, its mounts, its environment.
    fn in_pod(&self, argv: &[String]) -> Command {
        let mut mounts = String::new();
        for (dir, at) in &self.dirs {
            mounts.push_str(&format!("mkdir -p '{at}' && mount --bind '{}' '{at}' && ", dir.display()));
        }
        let mut cmd = self.host.command(Path::new("sh"));
        cmd.arg("-c").arg(format!("{mounts}exec \"$@\"")).arg("sh").args(argv).env_clear().envs(&self.env);
        cmd
    }

    fn run(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let child = self.in_pod(&self.argv()).stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("the container starts");
        self.child = Some(child);
        (self.started, self.ready) = (false, false);
        self.failures.clear();
        self.last.clear();
    }

    /// Kills the container's process (SIGKILL) and reaps it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The container started again in the same pod.
    fn restart(&mut self) {
        self.kill();
        self.restarts += 1;
        self.run();
    }

    /// Runs the probes that are due; true if readiness changed.
    fn probe(&mut self) -> bool {
        let was = self.ready;
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(_)) = c.try_wait()
        {
            // The container exited: restarted (restartPolicy Always).
            self.restart();
            return was;
        }
        let kinds: &[&'static str] = if self.started { &["livenessProbe", "readinessProbe"] } else { &["startupProbe"] };
        for &kind in kinds {
            let Some(probe) = Probe::of(&self.container, kind) else {
                if kind == "startupProbe" {
                    self.started = true;
                }
                continue;
            };
            if self.last.get(kind).is_some_and(|t| t.elapsed() < probe.period) {
                continue;
            }
            self.last.insert(kind, Instant::now());
            let ok = self.check(&probe.spec);
            let failures = self.failures.entry(kind).or_default();
            *failures = if ok { 0 } else { *failures + 1 };
            match kind {
                "startupProbe" if ok => self.started = true,
                "readinessProbe" => self.ready = ok || (self.ready && *failures < probe.failures),
                _ if *failures >= probe.failures => {
                    eprintln!("replay: {} failed its {kind} {} times: restarting it", self.name, probe.failures);
                    self.restart();
                    return was;
                }
                _ => {}
            }
        }
        was != self.ready
    }

    /// One probe (`httpGet` or `grpc`), with a short timeout.
    fn check(&self, spec: &Value) -> bool {
        let port = |p: &Value| -> u16 {
            match p {
                Value::Number(n) => n.as_u64().expect("a port") as u16,
                Value::String(name) => self.container["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|q| q["name"] == name.as_str())
                    .and_then(|q| q["containerPort"].as_u64())
                    .unwrap_or_else(|| panic!("no port {name}")) as u16,
                other => panic!("bad port {other}"),
            }
        };
        let addr = |p: u16| format!("{}:{p}", self.host.ip);
        if let Some(get) = spec.get("httpGet") {
            return http_ok(&addr(port(&get["port"])), get["path"].as_str().unwrap_or("/"));
        }
        if let Some(grpc) = spec.get("grpc") {
            return grpc_serving(&addr(port(&grpc["port"])));
        }
        panic!("unsupported probe {spec}")
    }

    /// preStop, SIGTERM, SIGKILL at the end of the grace period.
    fn terminate(&mut self) {
        let deadline = Instant::now() + self.grace;
        if let Some(hook) = self.container["lifecycle"]["preStop"]["exec"]["command"].as_array() {
            let argv: Vec<String> = hook.iter().map(|s| s.as_str().unwrap_or_default().to_owned()).collect();
            let mut h = self.in_pod(&argv).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("preStop runs");
            while Instant::now() < deadline && matches!(h.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = h.kill();
            let _ = h.wait();
        }
        let Some(mut c) = self.child.take() else { return };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn http_ok(addr: &str, path: &str) -> bool {
    let Ok(sock) = addr.parse() else { return false };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(1)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if write!(s, "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).is_err() {
        return false;
    }
    // "HTTP/1.1 2xx" or 3xx: success, as the kubelet counts it.
    matches!(head.get(9), Some(b'2' | b'3'))
}

fn grpc_serving(addr: &str) -> bool {
    // A runtime of its own on a thread of its own (the caller may be async).
    let addr = addr.to_owned();
    std::thread::spawn(move || grpc_check(&addr)).join().unwrap_or(false)
}

fn grpc_check(addr: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let check = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let reply = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.ok()?;
            Some(reply.into_inner().status() == tonic_health::pb::health_check_response::ServingStatus::Serving)
        };
        tokio::time::timeout(Duration::from_secs(1), check).await.ok().flatten().unwrap_or(false)
    })
}
