//! Fill-in-the-middle prompts encoded as mistral-common encodes them (tests/fixtures/fim.json,
//! from tests/fixtures/generate_fim.py), with the real v3 tokenizer; the v1 tokenizer has no
//! FIM tokens.

use std::path::PathBuf;

use cluster::Tokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn fim_prompts_are_mistral_commons() {
    let tok = Tokenizer::from_file(&fixtures().join("mixtral-v3-tiny/tokenizer.json")).expect("v3 tokenizer");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("fim.json")).expect("fim.json")).expect("parses");
    let cases = reference["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let (prompt, suffix) = (case["prompt"].as_str().expect("prompt"), case["suffix"].as_str().expect("suffix"));
        let ids = tok.encode_fim(prompt, suffix).expect("encodes").expect("the v3 tokenizer has FIM tokens");
        let pieces: String = ids.iter().map(|&id| tok.id_to_token(id).expect("a piece")).collect();
        assert_eq!(pieces, case["pieces"].as_str().expect("pieces"), "{prompt:?} / {suffix:?}");
    }
    let v1 = Tokenizer::from_file(&fixtures().join("mistral-v1-tiny/tokenizer.json")).expect("v1 tokenizer");
    assert!(!v1.has_fim() && v1.encode_fim("a", "b").expect("encodes").is_none());
}
