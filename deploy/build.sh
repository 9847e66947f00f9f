#!/usr/bin/env bash
# The release binaries the image ships, built as CI builds them: coordinator, tramctl and
# serve_bench; the worker (FEATURES=cuda for GPU workers).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p coordinator --bins
cargo build --release --locked -p worker --bin worker ${FEATURES:+--features "$FEATURES"}
