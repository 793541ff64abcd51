#!/usr/bin/env bash
# Builds the base image of deploy/Dockerfile from Debian packages, for machines that reach
# Debian's mirrors but no container registry: mmdebstrap assembles a minimal bookworm root
# filesystem (variant minbase: the Essential packages and apt, i.e. what debian:bookworm-slim
# holds, plus what vowd loads at run time), and `docker import` tags it exactly as the
# Dockerfile's FROM line names it. `docker build` then finds the base locally and needs no
# registry; where a registry is reachable the same Dockerfile pulls the real image instead.
#
#   deploy/base-image.sh            # build the tag unless it already exists
#   deploy/base-image.sh --force    # rebuild and re-tag it even if it exists
#
# Environment: VOW_BASE_IMAGE (default: the Dockerfile's FROM), DEBIAN_MIRROR (default
# http://deb.debian.org/debian), DEBIAN_SECURITY_MIRROR (http://deb.debian.org/debian-security).
# Needs root (mmdebstrap's root mode) and a Docker engine; installs mmdebstrap with apt if missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "base-image: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

# The tag is whatever the Dockerfile builds FROM, so the two cannot drift apart.
from="$(awk 'toupper($1) == "FROM" { print $2; exit }' "$here/Dockerfile")"
tag="${VOW_BASE_IMAGE:-$from}"
[ -n "$tag" ] || { echo "base-image: no FROM line in $here/Dockerfile" >&2; exit 1; }
suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

if [ "$force" -eq 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base-image: $tag already exists ($(docker image inspect -f '{{.Id}}' "$tag" | cut -c8-19)); --force rebuilds it" >&2
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "base-image: run as root (mmdebstrap builds the root filesystem in root mode)" >&2
  exit 1
fi
if ! command -v mmdebstrap >/dev/null 2>&1; then
  echo "base-image: installing mmdebstrap from Debian" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/vow-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs.tar"

# Runtime libraries of the binaries (check with `ldd vowd`): libc6 and libgcc-s1 are Essential,
# libstdc++6 comes in with apt (and is vowd's RocksDB runtime), ca-certificates for outbound TLS.
# The merged-usr hook lays out merged /usr itself, as debootstrap does for the official image,
# instead of installing the usrmerge package (and with it 50 MB of perl).
# The dpkg path excludes are the ones of Debian's -slim images (documentation, manuals,
# translations); they are kept in /etc/dpkg/dpkg.cfg.d so packages added later stay slim too.
echo "base-image: assembling a $suite minbase root filesystem from $mirror" >&2
start=$(date +%s)
# shellcheck disable=SC2016  # the hooks expand $1 (the root directory) themselves
mmdebstrap \
  --quiet \
  --mode=root \
  --variant=minbase \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include=libc6,libgcc-s1,libstdc++6,ca-certificates \
  --aptopt='Acquire::Languages "none"' \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/ldconfig/aux-cache' \
  --customize-hook='rm -f "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log "$1"/var/log/apt/*.log' \
  --customize-hook=': > "$1"/etc/machine-id' \
  "$suite" "$rootfs" \
  "deb $mirror $suite main" \
  "deb $mirror $suite-updates main" \
  "deb $security $suite-security main"
echo "base-image: root filesystem $(du -h "$rootfs" | cut -f1) in $(( $(date +%s) - start )) s" >&2

# The configuration an imported image lacks: the official image's PATH and CMD, and a label
# that tells this local stand-in from the registry's image.
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' \
  --change "LABEL dev.vow.base=\"mmdebstrap $suite minbase, built locally by deploy/base-image.sh\"" \
  --message "deploy/base-image.sh: mmdebstrap --variant=minbase $suite" \
  "$rootfs" "$tag" >/dev/null
echo "base-image: tagged $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.1f MB", $1 / 1e6 }')) in $(( $(date +%s) - start )) s" >&2
