#!/usr/bin/env bash
# Builds the fuzz targets (cargo-fuzz, libFuzzer) and runs each for a bounded time:
#   tests/fuzz/run.sh [SECONDS]        (SECONDS per target, 60 by default)
# Each target starts from its seeds, corpus/TARGET (committed), and keeps what it finds in
# target/corpus/TARGET, which later runs on this machine start from too. One line per target
# tells its executions; a crash (a panic, a failed assertion, a timeout, running out of
# memory) fails the run, its input left in artifacts/TARGET/ and its `cargo fuzz run`
# command printed to reproduce it. Every crash becomes a test in the crate whose code failed.
#
# Stable Rust is enough: no sanitizer (the code fuzzed is safe Rust: its failures are panics,
# which libFuzzer catches without one), so no nightly flag. Release build with debug
# assertions and overflow checks.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
cargo_fuzz_version=0.13.1
targets=(comm_frame http_bodies chat_template)

if ! cargo fuzz --version 2>/dev/null | grep -qF "$cargo_fuzz_version"; then
  cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi
# The same flags for the build and every run (other flags would build again).
flags=(--fuzz-dir . --release --debug-assertions --sanitizer none --codegen-units 16)

start=$SECONDS
cargo fuzz build "${flags[@]}"
echo "fuzz: built ${#targets[@]} targets in $((SECONDS - start)) s"

mkdir -p target/fuzz-logs
for t in "${targets[@]}"; do
  mkdir -p "target/corpus/$t"
  log="target/fuzz-logs/$t.log"
  # A target's dictionary (TARGET.dict: the words its inputs are made of), where it has one.
  dict=()
  if [ -f "$t.dict" ]; then dict=(-dict="$t.dict"); fi
  start=$SECONDS
  # New inputs go to the first corpus directory; the seeds are read from the second.
  if ! cargo fuzz run "${flags[@]}" "$t" "target/corpus/$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=30 -print_final_stats=1 "${dict[@]}" >"$log" 2>&1; then
    tail -n 80 "$log"
    echo "fuzz $t: CRASH after $((SECONDS - start)) s (the input is in tests/fuzz/artifacts/$t/; log: tests/fuzz/$log)" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  echo "fuzz $t: ${execs:-?} executions in $((SECONDS - start)) s, no crash"
done
