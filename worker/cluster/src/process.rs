//! What every server binary needs: graceful shutdown (Ctrl-C or SIGTERM cancels a token) and
//! accepted connections with Nagle's algorithm off.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first Ctrl-C or SIGTERM. Call inside a tokio runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let sigterm = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm => {}
        }
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    token
}

/// The connections `listener` accepts, with TCP_NODELAY set: streamed tokens and step RPCs
/// are small writes that Nagle's algorithm would hold back (up to a delayed-ACK timeout).
pub fn nodelay_incoming(listener: tokio::net::TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// A `kB` field of a `/proc` file (`VmHWM` of `/proc/self/status`, `MemAvailable` of
/// `/proc/meminfo`), in bytes; 0 where the OS does not report it.
pub fn proc_kb_field(path: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Memory this process may still take on the host, measured now: the smaller of the kernel's
/// `MemAvailable` and the room its cgroup's limits leave (see [`cgroup_headroom`]); 0 where
/// neither is known.
pub fn host_memory() -> u64 {
    let available = proc_kb_field("/proc/meminfo", "MemAvailable");
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|c| cgroup_headroom(std::path::Path::new("/sys/fs/cgroup"), &c));
    match (available, cgroup) {
        (0, Some(room)) => room,
        (a, Some(room)) => a.min(room),
        (a, None) => a,
    }
}

/// The room under the memory limits of the cgroup `proc_self_cgroup` (the text of
/// `/proc/self/cgroup`) names, cgroupfs mounted at `root`: the least, over the cgroup and its
/// ancestors, of limit − usage, where cgroup v2 reads `memory.max` and `memory.current`, v1
/// `memory.limit_in_bytes` and `memory.usage_in_bytes`; usage leaves out inactive file pages
/// (`memory.stat`: reclaimable page cache, e.g. of a checkpoint read earlier). `None` when no
/// limit is set ("max", or v1's page-rounded `i64::MAX`) or none can be read. In a container
/// whose cgroup namespace hides the path, the mount's root is the cgroup itself.
pub fn cgroup_headroom(root: &std::path::Path, proc_self_cgroup: &str) -> Option<u64> {
    let mut rooms = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (dir, files) = if controllers.is_empty() {
            (root.to_owned(), ("memory.max", "memory.current", "inactive_file"))
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
        } else {
            continue;
        };
        let path = path.trim().trim_start_matches('/');
        let leaf = if path.is_empty() || !dir.join(path).is_dir() { dir.clone() } else { dir.join(path) };
        for at in leaf.ancestors().take_while(|a| a.starts_with(&dir)) {
            let read = |f: &str| std::fs::read_to_string(at.join(f)).ok();
            let (Some(limit), Some(usage)) = (read(files.0), read(files.1)) else { continue };
            rooms.extend(headroom(&limit, &usage, &read("memory.stat").unwrap_or_default(), files.2));
        }
    }
    rooms.into_iter().min()
}

/// `limit − (usage − inactive file pages)`; `None` for no limit.
fn headroom(limit: &str, usage: &str, stat: &str, inactive_key: &str) -> Option<u64> {
    let limit = limit.trim();
    if limit == "max" {
        return None;
    }
    let limit: u64 = limit.parse().ok().filter(|&l| l < 1 << 60)?;
    let usage: u64 = usage.trim().parse().ok()?;
    let inactive: u64 = stat.lines().find_map(|l| l.strip_prefix(inactive_key)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(inactive)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    #[test]
    fn cgroup_limits_leave_the_least_room_of_the_cgroup_and_its_ancestors() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // v2: the parent's limit is tighter than the leaf's; inactive file pages do not count.
        write(r, &[("memory.max", "max\n"), ("memory.current", "999999999\n")]);
        write(&r.join("pod"), &[("memory.max", "8000\n"), ("memory.current", "5000\n"), ("memory.stat", "anon 1\ninactive_file 1000\n")]);
        write(&r.join("pod/box"), &[("memory.max", "10000\n"), ("memory.current", "4000\n"), ("memory.stat", "inactive_file 500\n")]);
        assert_eq!(cgroup_headroom(r, "0::/pod/box\n"), Some(4000), "8000 - (5000 - 1000) below 10000 - 3500");
        write(&r.join("free"), &[("memory.max", "max\n"), ("memory.current", "1\n")]);
        assert_eq!(cgroup_headroom(r, "0::/free\n"), None, "no limit anywhere");
        // A namespaced cgroup whose path the mount does not show: the mount's root is it.
        write(r, &[("memory.max", "3000\n"), ("memory.current", "1000\n")]);
        assert_eq!(cgroup_headroom(r, "0::/elsewhere\n"), Some(2000));
        // v1: the memory controller's hierarchy; no limit is i64::MAX rounded to a page.
        let v1 = tempfile::tempdir().unwrap();
        write(&v1.path().join("memory"), &[("memory.limit_in_bytes", "9223372036854771712\n"), ("memory.usage_in_bytes", "5\n")]);
        assert_eq!(cgroup_headroom(v1.path(), "4:memory:/x\n2:cpu:/\n"), None);
        write(
            &v1.path().join("memory/x"),
            &[("memory.limit_in_bytes", "6000\n"), ("memory.usage_in_bytes", "2500\n"), ("memory.stat", "total_inactive_file 500\n")],
        );
        assert_eq!(cgroup_headroom(v1.path(), "4:cpuacct,memory:/x\n"), Some(4000));
        assert_eq!(cgroup_headroom(v1.path(), "2:cpu:/\n"), None, "no memory controller");
    }
}
