#!/usr/bin/env bash
# Builds the vowd container image from binaries already built on this machine; it never runs
# cargo (build them first with `cargo build --workspace --bins`).
#
#   deploy/build-image.sh                    # -> vow:dev
#   deploy/build-image.sh --tag vow:1.2.3    # (or VOW_IMAGE=vow:1.2.3)
#   deploy/build-image.sh --local-base       # build the base locally, do not try a registry
#
# 1. If the Dockerfile's base (FROM) is not in the local image store, tries `docker pull` once
#    (skipped with --local-base or VOW_BASE_PULL=0) and otherwise builds it from Debian
#    packages with deploy/base-image.sh.
# 2. Copies vowd and vow from ${CARGO_TARGET_DIR:-$HOME/.cache/vow/target}/debug/, the
#    Dockerfile and the health check into a temporary build context (not the repository).
# 3. docker build -t TAG.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tag="${VOW_IMAGE:-vow:dev}"
pull="${VOW_BASE_PULL:-1}"
while [ $# -gt 0 ]; do
  case "$1" in
    -t | --tag) [ $# -ge 2 ] || { echo "build-image: $1 needs a value" >&2; exit 2; }; tag="$2"; shift ;;
    --tag=*) tag="${1#--tag=}" ;;
    --local-base) pull=0 ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

bin="${CARGO_TARGET_DIR:-$HOME/.cache/vow/target}/debug"
missing=()
for b in vowd vow; do
  [ -x "$bin/$b" ] || missing+=("$bin/$b")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-image: missing ${missing[*]}" >&2
  echo "build-image: build the binaries first: cargo build --workspace --bins (this script does not run cargo)" >&2
  exit 1
fi

start=$(date +%s)
base="$(awk 'toupper($1) == "FROM" { print $2; exit }' "$here/Dockerfile")"
if ! docker image inspect "$base" >/dev/null 2>&1; then
  if [ "$pull" != 0 ] && timeout 120 docker pull -q "$base" >/dev/null 2>&1; then
    echo "build-image: pulled $base" >&2
  else
    [ "$pull" = 0 ] || echo "build-image: cannot pull $base; building it from Debian packages" >&2
    VOW_BASE_IMAGE="$base" "$here/base-image.sh"
  fi
fi

ctx="$(mktemp -d "${TMPDIR:-/tmp}/vow-image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$here/healthcheck.sh" "$ctx/"
cp "$bin/vowd" "$bin/vow" "$ctx/"
chmod 0755 "$ctx/vowd" "$ctx/vow" "$ctx/healthcheck.sh"

# Labels: the version vowd reports and the checkout's commit (marked -dirty when the working
# tree has changes, which the binaries may include).
version="$("$bin/vowd" --version 2>/dev/null | awk '{ print $NF }')" || true
revision="$(git -C "$here" rev-parse --short=12 HEAD 2>/dev/null)" || revision=unknown
if [ "$revision" != unknown ] && [ -n "$(git -C "$here" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi

echo "build-image: building $tag from $bin (context $(du -sh "$ctx" | cut -f1))" >&2
docker build \
  --tag "$tag" \
  --build-arg "VOW_VERSION=${version:-dev}" \
  --build-arg "VOW_REVISION=$revision" \
  "$ctx"
size="$(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
echo "build-image: $tag ($size) in $(( $(date +%s) - start )) s" >&2
