//! Hosts of their own on one machine: each host is a network namespace with one interface
//! (`eth0`, an address in a /24 of its own) on a bridge in the test's namespace, which also
//! holds the subnet's first address so the test reaches every host as a client would.
//! Faults are made in the kernel, on the wire: [`Host::cut`] makes the two hosts' frames
//! for each other go to a hardware address no interface has (permanent neighbour entries,
//! so the packets vanish as in a real partition: no reset, no error, connections hang).
//! Needs root (`ip netns`, iproute2); [`Net::new`] says why where namespaces are refused.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

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

/// A bridge and the hosts on it; dropping it deletes them (their processes should be gone).
pub struct Net {
    bridge: String,
    prefix: String,
    tag: String,
    hosts: Vec<String>,
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
        let n = NETS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        let prefix = format!("10.{}.{}", 100 + pid % 100, (pid / 100 + n) % 250);
        let net = Net { bridge: format!("tb{tag}"), prefix, tag, hosts: Vec::new() };
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        must(&["addr", "add", &format!("{}.1/24", net.prefix), "dev", &net.bridge]);
        must(&["link", "set", &net.bridge, "up"]);
        Ok(net)
    }

    /// A new host on the bridge, named `name` in its namespace's name.
    pub fn host(&mut self, name: &str) -> Host {
        let i = self.hosts.len() + 2;
        let ns = format!("tram{}-{name}", self.tag);
        let port = format!("tv{}h{i}", self.tag);
        let ip = format!("{}.{i}", self.prefix);
        must(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        must(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        must(&["link", "set", &port, "master", &self.bridge, "up"]);
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
        let _ = ip(&["link", "del", &self.bridge]);
    }
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
