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

/// Path of one of the workspace's binaries, built (once per test process) if needed.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "worker", "-p", "coordinator", "--bins"])
            .current_dir(repo_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
    });
    // tests/target/<profile>/deps/<test> -> <profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
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
        let mut child = Command::new(binary(binary_name))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{binary_name} starts: {e}"));
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
