#!/usr/bin/env bash
# Installs what building and testing vow needs beyond the Rust toolchain, once per machine:
# libclang (RocksDB's bindgen) from Debian; with --with-python (what `make test` asks for) also a
# Python venv with grpcio for the external-client test and cargo-deny for the supply-chain check.
# Idempotent and quiet when everything is already there.
set -euo pipefail

cache="${VOW_CACHE:-$HOME/.cache/vow}"
mkdir -p "$cache"

need_apt=()
# bindgen (through clang-sys) needs libclang itself; libclang-cpp, preinstalled on some images, is not it.
if ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1; then
  need_apt+=(libclang-dev)
fi
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
# The jepsen harness builds its hosts from network namespaces, iptables and tc.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
# vow-lazyfs (the power-loss and disk-fault filesystem) mounts directly as root; fusermount3 is how
# it mounts and unmounts otherwise, and how a mount left behind is cleaned up by hand.
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
# Its clock faults run each vowd under libfaketime.
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] || need_apt+=(libfaketime)
# promtool (Debian's prometheus package) checks /metrics in the tests.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} from Debian" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ "${1:-}" = "--with-python" ]; then
  venv="$cache/venv"
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c 'import grpc, grpc_tools, grpc_reflection, yaml' >/dev/null 2>&1; then
    echo "setup: installing grpcio, grpcio-tools, grpcio-reflection and PyYAML" >&2
    "$venv/bin/pip" install -q 'grpcio>=1.60' 'grpcio-tools>=1.60' 'grpcio-reflection>=1.60' 'PyYAML>=6'
  fi
fi

# cargo-deny, pinned, into the cache (not ~/.cargo/bin): `make test` runs its licence, ban and
# source checks (deny.toml). Built from crates.io once per machine (a few minutes).
if [ "${1:-}" = "--with-python" ]; then
  deny_version="0.20.2"
  if ! "$cache/bin/cargo-deny" --version 2>/dev/null | grep -q " $deny_version"; then
    echo "setup: installing cargo-deny $deny_version into $cache" >&2
    cargo install --quiet --locked --root "$cache" cargo-deny --version "$deny_version"
  fi
fi
