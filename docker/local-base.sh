#!/usr/bin/env bash
# Make a Debian base image with python3 without any registry: debootstrap a minimal bookworm
# root file system and import it into podman (or docker). Tests and air-gapped hosts build the
# gptpipe image on it (`docker/build.sh --base-image localhost/debian-base:bookworm`).
#
#   docker/local-base.sh [--engine podman|docker] [--tag NAME] [--mirror URL] [--cache DIR]
#
# The root file system tarball is cached (~60 MB, ~1 min to make, seconds to import), keyed by
# suite and package list, so a second call only imports it. Needs root and debootstrap.
set -euo pipefail

engine="${GPTPIPE_ENGINE:-podman}"
tag="localhost/debian-base:bookworm"
suite="bookworm"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/gptpipe"
mirror=""
packages="python3,python3-venv,ca-certificates"

die() { echo "docker/local-base.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine="${2:?}"; shift 2 ;;
    --tag) tag="${2:?}"; shift 2 ;;
    --mirror) mirror="${2:?}"; shift 2 ;;
    --cache) cache="${2:?}"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

command -v "$engine" >/dev/null 2>&1 || die "'$engine' is not on PATH"
if "$engine" image exists "$tag" 2>/dev/null || "$engine" image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already present" >&2
  exit 0
fi

if [ -z "$mirror" ]; then
  # The host's own Debian mirror (deb822 or one-line sources), so a proxied host works as is.
  mirror="$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)\/\{0,1\}$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
  [ -n "$mirror" ] || mirror="$(sed -n 's/^deb \(http[^ ]*\/debian\)\/\{0,1\} .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n1)"
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

tarball="$cache/debian-$suite-$(echo "$packages" | sha256sum | cut -c1-8).tar.gz"
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install debootstrap)"
  mkdir -p "$cache"
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap $suite from $mirror (about a minute)" >&2
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  # Written aside and renamed: an interrupted run never leaves a truncated tarball behind.
  tar -C "$rootfs" -czf "$tarball.part" .
  mv "$tarball.part" "$tarball"
fi
"$engine" import "$tarball" "$tag" >/dev/null
echo "imported $tag from $tarball" >&2
