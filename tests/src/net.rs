//! Hosts of their own on one machine: each host is a network namespace with one interface
//! (`eth0`, an address in a /24 of its own) on a bridge in the test's namespace, which also
//! holds the subnet's first address so the test reaches every host as a client would.
//! Faults are made in the kernel, on the wire: [`Host::cut`] makes the two hosts' frames
//! for each other go to a hardware address no interface has (permanent neighbour entries,
//! so the packets vanish as in a real partition: no reset, no error, connections hang).
//! [`Net::delayed`] puts the test process between the hosts instead of a bridge, delaying
//! every frame. Needs root (`ip netns`, iproute2, `/dev/net/tun`); [`Net::new`] and
//! [`Net::delayed`] say why where namespaces are refused.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A hardware address no interface has: frames sent to it are flooded and dropped by all.
const NOWHERE: &str = "02:00:00:00:00:01";

static NETS: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() { Ok(()) } else { Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())) }
}

fn must(args: &[&str]) {
    ip(args).unwrap_or_else(|e| panic!("{e}"));
}

/// A bridge (or a delaying switch) and the hosts on it; dropping it deletes them (their
/// processes should be gone).
pub struct Net {
    link: Link,
    prefix: String,
    tag: String,
    hosts: Vec<String>,
}

/// What joins the hosts: a bridge, or this process's switch (with the test's own port).
enum Link {
    Bridge(String),
    Switch { switch: Arc<Switch>, port: String },
}

/// One host: a namespace and its address (the [`Net`] owns the namespace).
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: String,
}

impl Net {
    /// A fresh bridge with a subnet of its own, or why this machine refuses namespaces.
    pub fn new() -> Result<Net, String> {
        let (tag, prefix) = Self::fresh();
        let bridge = format!("tb{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        must(&["addr", "add", &format!("{prefix}.1/24"), "dev", &bridge]);
        must(&["link", "set", &bridge, "up"]);
        Ok(Net { link: Link::Bridge(bridge), prefix, tag, hosts: Vec::new() })
    }

    /// A fresh network whose every frame, between any two hosts or between the test and a
    /// host, arrives `delay` ± `jitter` after it was sent (see [`Switch`]).
    pub fn delayed(delay: Duration, jitter: Duration) -> Result<Net, String> {
        let (tag, prefix) = Self::fresh();
        let port = format!("tt{tag}h1");
        let file = tap(&port)?;
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &port])?;
        must(&["link", "set", &port, "up"]);
        let switch = Switch::start(delay, jitter);
        switch.attach(file);
        Ok(Net { link: Link::Switch { switch, port }, prefix, tag, hosts: Vec::new() })
    }

    /// A tag for this network's names and its /24.
    fn fresh() -> (String, String) {
        let n = NETS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        (format!("{}{n}", pid % 100_000), format!("10.{}.{}", 100 + pid % 100, (pid / 100 + n) % 250))
    }

    /// A new host on the bridge, named `name` in its namespace's name.
    pub fn host(&mut self, name: &str) -> Host {
        let i = self.hosts.len() + 2;
        let ns = format!("tram{}-{name}", self.tag);
        let ip = format!("{}.{i}", self.prefix);
        must(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        match &self.link {
            Link::Bridge(bridge) => {
                let port = format!("tv{}h{i}", self.tag);
                must(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
                must(&["link", "set", &port, "master", bridge, "up"]);
            }
            Link::Switch { switch, .. } => {
                let name = format!("tt{}h{i}", self.tag);
                let file = tap(&name).unwrap_or_else(|e| panic!("{e}"));
                must(&["link", "set", &name, "netns", &ns]);
                must(&["-n", &ns, "link", "set", &name, "name", "eth0"]);
                switch.attach(file);
            }
        }
        must(&["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        must(&["-n", &ns, "link", "set", "eth0", "up"]);
        must(&["-n", &ns, "link", "set", "lo", "up"]);
        Host { ns, ip }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = ip(&["netns", "del", ns]);
        }
        match &self.link {
            Link::Bridge(bridge) => {
                let _ = ip(&["link", "del", bridge]);
            }
            Link::Switch { switch, port } => {
                let _ = ip(&["link", "del", port]);
                switch.stop();
            }
        }
    }
}

/// A network whose frames all pass through the test process: each host's interface is a TAP
/// device whose other end this process holds, and a switch thread delivers every frame
/// `delay` ± `jitter` (uniform) after it was sent, in order between any two hosts, as a wire
/// with that latency would (this kernel's qdiscs cannot delay: no `netem`). A TAP device
/// without a virtio header gets no segmentation offload, so every frame is one wire frame.
struct Switch {
    stopped: AtomicBool,
    ports: RwLock<Vec<Arc<File>>>,
    queue: Mutex<Queue>,
    ready: Condvar,
    delay: Duration,
    jitter: Duration,
}

/// A frame waiting in the switch: when it is due, its arrival number, its port out, the frame.
type Waiting = Reverse<(Instant, u64, usize, Vec<u8>)>;

#[derive(Default)]
struct Queue {
    /// Frames by due time (then arrival), with the port each goes out of.
    due: BinaryHeap<Waiting>,
    /// Where each source hardware address was seen.
    macs: HashMap<[u8; 6], usize>,
    /// The last due time between two ports, so that frames keep their order.
    last: HashMap<(usize, usize), Instant>,
    seq: u64,
    random: u64,
}

impl Switch {
    fn start(delay: Duration, jitter: Duration) -> Arc<Switch> {
        let switch =
            Arc::new(Switch { stopped: AtomicBool::new(false), ports: RwLock::default(), queue: Mutex::default(), ready: Condvar::new(), delay, jitter });
        switch.queue.lock().expect("queue").random = 0x9E37_79B9_7F4A_7C15;
        let s = switch.clone();
        std::thread::spawn(move || s.deliver());
        switch
    }

    /// Adds `tap` as a port and starts reading its frames.
    fn attach(self: &Arc<Self>, tap: File) {
        let tap = Arc::new(tap);
        let port = {
            let mut ports = self.ports.write().expect("ports");
            ports.push(tap.clone());
            ports.len() - 1
        };
        let s = self.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            // Ends when the device goes (its namespace deleted, or the link removed).
            while let Ok(n) = (&*tap).read(&mut buf) {
                if n >= 14 {
                    s.enqueue(port, buf[..n].to_vec());
                }
            }
        });
    }

    fn enqueue(&self, from: usize, frame: Vec<u8>) {
        let now = Instant::now();
        let mut q = self.queue.lock().expect("queue");
        let (dst, src): ([u8; 6], [u8; 6]) = (frame[..6].try_into().expect("6"), frame[6..12].try_into().expect("6"));
        q.macs.insert(src, from);
        let to: Vec<usize> = match q.macs.get(&dst) {
            Some(&p) if dst[0] & 1 == 0 => vec![p],
            _ => (0..self.ports.read().expect("ports").len()).filter(|&p| p != from).collect(),
        };
        for p in to {
            // xorshift64: a uniform offset in [-jitter, +jitter].
            q.random ^= q.random << 13;
            q.random ^= q.random >> 7;
            q.random ^= q.random << 17;
            let u = (q.random >> 11) as f64 / (1u64 << 53) as f64;
            let wire = self.delay.as_secs_f64() + self.jitter.as_secs_f64() * (2.0 * u - 1.0);
            let mut due = now + Duration::from_secs_f64(wire.max(0.0));
            if let Some(&last) = q.last.get(&(from, p)) {
                due = due.max(last);
            }
            q.last.insert((from, p), due);
            q.seq += 1;
            let seq = q.seq;
            q.due.push(Reverse((due, seq, p, frame.clone())));
        }
        self.ready.notify_one();
    }

    /// Ends [`Switch::deliver`] (the readers end with their devices).
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Writes each frame out of its port when it is due, until stopped.
    fn deliver(&self) {
        let mut q = self.queue.lock().expect("queue");
        while !self.stopped.load(Ordering::Acquire) {
            let now = Instant::now();
            match q.due.peek() {
                Some(Reverse((due, ..))) if *due <= now => {
                    let Reverse((_, _, port, frame)) = q.due.pop().expect("peeked");
                    drop(q);
                    if let Some(tap) = self.ports.read().expect("ports").get(port).cloned() {
                        let _ = (&*tap).write(&frame);
                    }
                    q = self.queue.lock().expect("queue");
                }
                Some(Reverse((due, ..))) => {
                    let wait = *due - now;
                    q = self.ready.wait_timeout(q, wait).expect("queue").0;
                }
                None => q = self.ready.wait(q).expect("queue"),
            }
        }
    }
}

/// A TAP device named `name` (no packet information header), held by the returned file.
fn tap(name: &str) -> Result<File, String> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54CA;
    let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(|e| format!("/dev/net/tun: {e}"))?;
    let mut req = IfReq { name: [0; 16], flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an `ifreq` (name, then flags), which `req` lays out.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(format!("TUNSETIFF {name}: {}", std::io::Error::last_os_error()));
    }
    Ok(file)
}

impl Host {
    /// `program` run inside this host's namespace (`ip netns exec`, which execs it: the
    /// child's pid is the program's).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Frames between this host and `other` vanish, both ways, from now until [`Host::heal`].
    pub fn cut(&self, other: &Host) {
        for (from, to) in [(self, other), (other, self)] {
            must(&["-n", &from.ns, "neigh", "replace", &to.ip, "lladdr", NOWHERE, "dev", "eth0", "nud", "permanent"]);
        }
    }

    /// Frames between this host and `other` flow again (undoes [`Host::cut`]).
    pub fn heal(&self, other: &Host) {
        for (from, to) in [(self, other), (other, self)] {
            must(&["-n", &from.ns, "neigh", "del", &to.ip, "dev", "eth0"]);
        }
    }
}
