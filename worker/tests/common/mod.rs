//! Shared by the worker's process tests: a `worker serve` child process and the fixtures.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A `worker serve` child process, killed on drop.
pub struct WorkerProcess {
    pub child: Child,
    pub addr: String,
}

impl WorkerProcess {
    // Each test binary uses the constructor it needs.
    #[allow(dead_code)]
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `worker serve` with `extra` arguments. The binary is `TRAMONTANE_WORKER_BIN` where set
    /// (tests run on another machine than the one they were built on), else this build's.
    pub fn start_with(extra: &[&str]) -> Self {
        let bin = std::env::var_os("TRAMONTANE_WORKER_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_worker")), PathBuf::from);
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--comm-timeout-secs", "20"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("worker starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("reads the address");
        let addr = line.trim().strip_prefix("listening on ").expect("address line").to_owned();
        WorkerProcess { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fixture directory: under `TRAMONTANE_FIXTURES` where set, else beside this crate.
pub fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("TRAMONTANE_FIXTURES").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    dir.join(name)
}

/// A fixture's `reference.json` (written by tests/fixtures/generate.py from transformers).
#[derive(serde::Deserialize)]
pub struct Reference {
    pub cases: Vec<Case>,
}

// Each test binary reads the fields it checks.
#[allow(dead_code)]
#[derive(serde::Deserialize)]
pub struct Case {
    pub prompt_ids: Vec<u32>,
    pub prompt_logprobs: Vec<Option<f32>>,
    pub greedy_ids: Vec<u32>,
    pub greedy_logprobs: Vec<f32>,
}

pub fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}
