//! Request bodies of the OpenAI-compatible HTTP API, any bytes, read and checked as the
//! handlers of `/v1/completions`, `/v1/chat/completions`, `/v1/fim/completions` and
//! `/v1/embeddings` read and check them before a replica is asked
//! (`coordinator::openai::check_body`: the JSON, the HTTP-only checks, chat templates and the
//! tools' encoding, tokenization, validation), for the v3 and the v1 fixture models. A refusal
//! is fine; a panic is a crash.

#![no_main]

use coordinator::openai::{Route, check_body};
use libfuzzer_sys::fuzz_target;

const ROUTES: [Route; 4] = [Route::Completions, Route::ChatCompletions, Route::FimCompletions, Route::Embeddings];

fuzz_target!(|body: &[u8]| {
    for served in tramontane_fuzz::served() {
        for route in ROUTES {
            if let Ok(requests) = check_body(served, route, body) {
                // What validation lets through fits the model.
                for r in requests {
                    assert!(!r.prompt.is_empty());
                    assert!(r.prompt.iter().all(|&t| (t as usize) < served.limits.vocab_size), "{route:?}: a token id past the vocabulary");
                    assert!(r.prompt.len() <= served.limits.max_context, "{route:?}: a prompt longer than the context");
                }
            }
        }
    }
});
