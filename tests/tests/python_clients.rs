//! The clients users run, against a real cluster: the official `openai` and `mistralai`
//! Python SDKs on the HTTP API and `grpcio` stubs generated from proto/ on the gRPC API
//! (tests/python/), on single-worker replicas and on a sharded one. The
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

/// The test files for a generating model: both SDKs, every field, embeddings' shape.
const GENERATING: [&str; 5] = ["test_clients.py", "test_mistral.py", "test_fields.py", "test_embeddings.py", "test_structured.py"];

/// One cluster at a time: the tests share the virtualenv and the stubs they make, and the
/// machine's cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `files` of tests/python/ against `tramctl up` serving `fixture` with `layout` flags.
fn python_clients_against(fixture_name: &str, layout: &[&str], files: &[&str]) {
    python_clients_with(fixture_name, layout, &[], files);
}

/// [`python_clients_against`] with `env` (name, value) for the tests too.
fn python_clients_with(fixture_name: &str, layout: &[&str], env: &[(&str, String)], files: &[&str]) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let python = python_env();
    let stubs = target_dir().join("py-stubs");
    std::fs::create_dir_all(&stubs).expect("stub dir");
    generate_stubs(&python, &stubs);

    let model = fixture(fixture_name);
    let model_arg = model.display().to_string();
    let mut args = vec!["up", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--model", &model_arg];
    args.extend(layout);
    let mut coordinator = Server::start("tramctl", &args);
    let line = coordinator.next_line();
    let http = line.strip_prefix("http listening on ").unwrap_or_else(|| panic!("unexpected line {line:?}")).to_owned();
    // The APIs are up at once; the model is served once the workers loaded it (over TLS,
    // the tests wait for it themselves).
    let tls = env.iter().any(|(k, _)| *k == "TRAMONTANE_TLS_CA");
    if !tls {
        tests::wait_ready(&http, std::time::Duration::from_secs(300));
    }

    run(Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .args(files.iter().map(|f| repo_root().join("tests/python").join(f)))
        .env("TRAMONTANE_HTTP", format!("{}://{http}/v1", if tls { "https" } else { "http" }))
        .env("TRAMONTANE_GRPC", &coordinator.addr)
        .env("TRAMONTANE_STUBS", &stubs)
        .env("TRAMONTANE_REFERENCE", model.join("reference.json"))
        .env("TRAMONTANE_TRAMCTL", tests::binary("tramctl"))
        .envs(env.iter().map(|(k, v)| (k, v))));
}

/// API keys over TLS: a coordinator started with `tramctl up --api-keys FILE --tls-cert C
/// --tls-key K` (a key per line, with limits and an admin key; a certificate for 127.0.0.1
/// signed by a CA made here), the SDKs and gRPC trusting that CA with no key, a wrong key and
/// each key, and plain-text clients refused.
#[test]
fn official_python_clients_with_api_keys_over_tls() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (ca, cert, key) = test_certificates(dir.path());
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        "# name key [rpm=N] [tpm=N] [admin]\n\
         alice sk-alice-0000000000000001\n\
         bob sk-bob-00000000000000000002 rpm=3\n\
         carol sk-carol-000000000000003 tpm=120\n\
         ops sk-ops-00000000000000000004 admin\n",
    )
    .expect("the key file");
    let path = keys.display().to_string();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    python_clients_with(
        "mistral-v1-tiny",
        &["--workers", "1", "--api-keys", &path, "--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca.display().to_string()],
        &[("TRAMONTANE_API_KEYS", path.clone()), ("TRAMONTANE_TLS_CA", ca.display().to_string())],
        &["test_keys.py"],
    );
}

/// A CA, and a server certificate for 127.0.0.1 and localhost it signed, as PEM files in
/// `dir`: (CA, certificate, key).
fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("a CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "tramontane test CA");
    let ca = ca_params.self_signed(&ca_key).expect("the CA certificate");
    let key = rcgen::KeyPair::generate().expect("a server key");
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("server parameters");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("the server certificate");
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca.pem()).expect("ca.pem");
    std::fs::write(&paths.1, cert.pem()).expect("cert.pem");
    std::fs::write(&paths.2, key.serialize_pem()).expect("key.pem");
    paths
}

/// Two replicas of one worker each, a v1 tokenizer (no FIM tokens).
#[test]
fn official_python_clients_work_end_to_end() {
    python_clients_against("mistral-v1-tiny", &["--workers", "2"], &GENERATING);
}

/// One replica sharded over two workers (tensor parallel), Mixtral with the v3 tokenizer
/// (fill-in-the-middle served).
#[test]
fn official_python_clients_work_on_a_sharded_replica() {
    python_clients_against("mixtral-v3-tiny", &["--workers", "2", "--tp", "2"], &GENERATING);
}

/// Structured output and tool calls on Mixtral's experts split over two workers (EP 2).
#[test]
fn official_python_clients_constrain_output_on_an_expert_parallel_replica() {
    python_clients_against("mixtral-v3-tiny", &["--workers", "2", "--ep", "2"], &["test_structured.py"]);
}

/// An embedding model (`MistralModel`, no lm_head) sharded TP 2: its embeddings against
/// transformers', through both SDKs and gRPC.
#[test]
fn official_python_clients_embed_with_an_embedding_model() {
    python_clients_against("mistral-embed-tiny", &["--workers", "2", "--tp", "2"], &["test_embeddings.py"]);
}

/// The embedding model in two pipeline stages: the last stage pools.
#[test]
fn official_python_clients_embed_over_pipeline_stages() {
    python_clients_against("mistral-embed-tiny", &["--workers", "2", "--pp", "2"], &["test_embeddings.py"]);
}
