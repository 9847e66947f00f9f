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
    pub fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["serve", "--listen", "127.0.0.1:0", "--comm-timeout-secs", "20"])
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

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
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
