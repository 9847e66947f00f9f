//! A broken checkpoint gives an error naming the file and the tensor, never a panic.

use std::path::{Path, PathBuf};

use worker::{Cpu, Engine, EngineError, EngineOptions};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mistral-nemo-tiny")
}

/// A copy of the fixture whose model.safetensors is rewritten by `edit`.
fn broken_copy(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>, &mut Vec<u8>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixture().join("config.json"), dir.path().join("config.json")).expect("copy config");
    let bytes = std::fs::read(fixture().join("model.safetensors")).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let mut data = bytes[8 + n..].to_vec();
    edit(&mut header, &mut data);
    let header = serde_json::to_vec(&header).expect("json");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    std::fs::write(dir.path().join("model.safetensors"), out).expect("write");
    dir
}

fn load(dir: &Path) -> EngineError {
    match Engine::load(Cpu, dir, &EngineOptions::default()) {
        Ok(_) => panic!("a broken checkpoint loaded"),
        Err(e) => e,
    }
}

const TENSOR: &str = "model.layers.1.mlp.up_proj.weight";

#[test]
fn missing_tensor_is_named() {
    let dir = broken_copy(|h, _| {
        h.remove(TENSOR);
    });
    let e = load(dir.path());
    assert!(matches!(e, EngineError::MissingTensor { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(TENSOR) && msg.contains(&dir.path().display().to_string()), "{msg}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = broken_copy(|h, _| {
        // Same byte count, transposed shape.
        h.get_mut(TENSOR).expect("tensor")["shape"] = serde_json::json!([48, 96]);
    });
    let msg = load(dir.path()).to_string();
    assert!(msg.contains(TENSOR) && msg.contains("model.safetensors"), "{msg}");
    assert!(msg.contains("[48, 96]") && msg.contains("[96, 48]"), "{msg}");
}

#[test]
fn truncated_file_is_named() {
    let dir = broken_copy(|_, data| data.truncate(data.len() / 2));
    let msg = load(dir.path()).to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");
    // The header itself cut short.
    std::fs::write(dir.path().join("model.safetensors"), [200u8, 1, 0, 0, 0, 0, 0, 0, b'{']).expect("write");
    let msg = load(dir.path()).to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("past the end"), "{msg}");
}

#[test]
fn unknown_architecture_and_missing_files_are_clear() {
    let dir = broken_copy(|_, _| {});
    let config = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
    std::fs::write(dir.path().join("config.json"), config.replace("MistralForCausalLM", "LlamaForCausalLM")).expect("write");
    let msg = load(dir.path()).to_string();
    assert!(msg.contains("LlamaForCausalLM") && msg.contains("MixtralForCausalLM"), "{msg}");
    std::fs::remove_file(dir.path().join("config.json")).expect("rm");
    let msg = load(dir.path()).to_string();
    assert!(msg.contains("config.json"), "{msg}");
    let empty = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixture().join("config.json"), empty.path().join("config.json")).expect("copy");
    let msg = load(empty.path()).to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn wrong_dtype_is_named() {
    let dir = broken_copy(|h, _| {
        h.get_mut(TENSOR).expect("tensor")["dtype"] = serde_json::json!("I16");
    });
    let msg = load(dir.path()).to_string();
    assert!(msg.contains(TENSOR) && msg.contains("I16"), "{msg}");
}
