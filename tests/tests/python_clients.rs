//! The clients users run, against a real cluster: the official `openai` Python SDK on the
//! HTTP API and `grpcio` stubs generated from proto/ on the gRPC API (tests/python/). The
//! packages are installed from PyPI into a virtualenv under the target directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::{Server, fixture, repo_root, target_dir};

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// A virtualenv with tests/python/requirements.txt, reinstalled when that file changes.
fn python_env() -> PathBuf {
    let venv = target_dir().join("py-clients");
    let requirements = repo_root().join("tests/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements");
    let stamp = venv.join("requirements.installed");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&venv);
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        run(Command::new(venv.join("bin/python")).args(["-m", "pip", "install", "--quiet", "-r"]).arg(&requirements));
        std::fs::write(&stamp, wanted).expect("stamp");
    }
    venv.join("bin/python")
}

fn generate_stubs(python: &Path, out: &Path) {
    let proto = repo_root().join("proto/proto");
    run(Command::new(python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg(proto.join("tramontane/v1/inference.proto")));
}

#[test]
fn official_python_clients_work_end_to_end() {
    let python = python_env();
    let stubs = target_dir().join("py-stubs");
    std::fs::create_dir_all(&stubs).expect("stub dir");
    generate_stubs(&python, &stubs);

    // A whole local cluster: `tramctl up` with two worker processes.
    let model = fixture("mistral-v1-tiny");
    let mut coordinator = Server::start(
        "tramctl",
        &["up", "--workers", "2", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--model", &model.display().to_string()],
    );
    let line = coordinator.next_line();
    let http = line.strip_prefix("http listening on ").unwrap_or_else(|| panic!("unexpected line {line:?}")).to_owned();
    // The APIs are up at once; the model is served once the workers loaded it.
    tests::wait_ready(&http, std::time::Duration::from_secs(300));

    run(Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(repo_root().join("tests/python/test_clients.py"))
        .arg(repo_root().join("tests/python/test_mistral.py"))
        .env("TRAMONTANE_HTTP", format!("http://{http}/v1"))
        .env("TRAMONTANE_GRPC", &coordinator.addr)
        .env("TRAMONTANE_STUBS", &stubs)
        .env("TRAMONTANE_REFERENCE", model.join("reference.json")));
}
