#!/usr/bin/env bash
# The whole gate: formatting, lints, every Rust test (unit, property, storage conformance,
# multi-process cluster tests) and the external-client test generated from proto/.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vow/target}"
scripts/setup.sh --with-python

cargo fmt --all --check
# The Kubernetes manifests render (kustomize) and validate against the API versions we claim.
deploy/k8s/validate.sh
# Supply chain: licences, banned crates, registries (deny.toml; advisories need GitHub, see
# docs/security.md).
"${VOW_CACHE:-$HOME/.cache/vow}/bin/cargo-deny" check --hide-inclusion-graph licenses bans sources
cargo clippy --workspace --all-targets --locked -- -D warnings
# The multi-process tests run the real binaries, so build them first. The sabotaged vowd (test-only
# deliberate bugs, for the jepsen checker's proof tests) is built first and set aside under its own
# name; the default build then puts the real vowd back in place.
cargo build -p vow-server --features sabotage --bin vowd --locked
# Replace, not overwrite: a copy still running (a test's leftover) would make cp fail.
rm -f "$CARGO_TARGET_DIR/debug/vowd-sabotage"
cp "$CARGO_TARGET_DIR/debug/vowd" "$CARGO_TARGET_DIR/debug/vowd-sabotage"
cargo build --workspace --bins --locked
# The container image the compose tests run, from the binaries just built (its base image is
# assembled from Debian packages when no registry is reachable).
deploy/build-image.sh --local-base
# Every cluster test keeps its nodes' logs under VOW_TEST_LOGS; those of each test that failed a
# try (FAIL or FLAKY) are printed after the run, so a failure in CI can be read afterwards.
export VOW_TEST_LOGS="$CARGO_TARGET_DIR/test-logs"
rm -rf "$VOW_TEST_LOGS" && mkdir -p "$VOW_TEST_LOGS"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast 2>&1 | tee "$VOW_TEST_LOGS/nextest.txt" || status=$?
  scripts/failed-test-logs.sh "$VOW_TEST_LOGS"
else
  cargo test --workspace --locked --no-fail-fast || status=$?
fi
[ "$status" = 0 ] || exit "$status"
"${VOW_CACHE:-$HOME/.cache/vow}/venv/bin/python" tests/python/external_client.py --bin-dir "$CARGO_TARGET_DIR/debug"
# The Python example and the seed's integrations (task marketplace, Fission function and
# workflow) against a live cluster.
"${VOW_CACHE:-$HOME/.cache/vow}/venv/bin/python" tests/python/integrations.py --bin-dir "$CARGO_TARGET_DIR/debug"
# A short fault-injection run against the real server with every nemesis — membership, clock
# skew (libfaketime), power loss and disk faults (FUSE) included — (the long one is in the README),
# secured: TLS on every port, mutual TLS between nodes, API tokens (every other multi-process
# test runs plain text, tests/tests/security.rs secured).
"$CARGO_TARGET_DIR/debug/vow-jepsen" cleanup
"$CARGO_TARGET_DIR/debug/vow-jepsen" test --nodes 5 --time-limit 100 --nemesis all --tls \
  --seed "${VOW_JEPSEN_SEED:-$RANDOM}" --out "${VOW_JEPSEN_OUT:-$(mktemp -d /tmp/vow-jepsen-ci.XXXXXX)}"
echo "all tests passed"
