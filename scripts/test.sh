#!/usr/bin/env bash
# The whole gate: formatting, lints, every Rust test (unit, property, storage conformance,
# multi-process cluster tests) and the external-client test generated from proto/.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vow/target}"
scripts/setup.sh --with-python

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The multi-process tests run the real binaries, so build them first.
cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
"${VOW_CACHE:-$HOME/.cache/vow}/venv/bin/python" tests/python/external_client.py --bin-dir "$CARGO_TARGET_DIR/debug"
echo "all tests passed"
