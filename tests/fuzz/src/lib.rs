//! What the fuzz targets share: the repository's fixture models served as the coordinator
//! serves a checkpoint (`Served::load`, as `coordinator::server` does), loaded once.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cluster::{ModelConfig, Tokenizer};
use coordinator::frontend::Served;

/// A fixture checkpoint of tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

/// The model in `dir` as the coordinator serves it (`Served::load`).
pub fn load(dir: &Path) -> Served {
    let config = ModelConfig::from_file(&dir.join("config.json")).expect("the fixture's config.json");
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).expect("the fixture's tokenizer.json");
    Served::load(dir, &config, tokenizer).expect("the fixture's chat template")
}

/// The v3 fixture (Mixtral: tool-calling and fill-in-the-middle tokens) and the v1 one
/// (Mistral: neither), each loaded once.
pub fn served() -> [&'static Served; 2] {
    static V3: OnceLock<Served> = OnceLock::new();
    static V1: OnceLock<Served> = OnceLock::new();
    [V3.get_or_init(|| load(&fixture("mixtral-v3-tiny"))), V1.get_or_init(|| load(&fixture("mistral-v1-tiny")))]
}
