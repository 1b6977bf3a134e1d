#!/usr/bin/env bash
# Build the gptpipe image with docker (BuildKit) or podman (buildah), from the repository root.
#
#   docker/build.sh [--engine docker|podman] [--base-image IMAGE] [--target runtime|worker]
#                   [--cpu] [--tag NAME:TAG] [--ca-bundle FILE] [--pip-conf FILE]
#                   [--build-arg K=V]... [--dry-run] [-- extra engine build flags]
#
# --ca-bundle / --pip-conf reach pip and apt as build *secrets*: mounted for the RUN steps that
# install packages and absent from every layer, the image config and `history`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

engine="${GPTPIPE_ENGINE:-}"
base_image=""
target="runtime"
tag=""
cpu=0
ca_bundle=""
pip_conf=""
build_args=()
extra=()
dry=0

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "docker/build.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine="${2:?--engine needs docker or podman}"; shift 2 ;;
    --base-image) base_image="${2:?--base-image needs an image}"; shift 2 ;;
    --target) target="${2:?--target needs runtime or worker}"; shift 2 ;;
    --tag|-t) tag="${2:?--tag needs NAME:TAG}"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --ca-bundle) ca_bundle="${2:?--ca-bundle needs a file}"; shift 2 ;;
    --pip-conf) pip_conf="${2:?--pip-conf needs a file}"; shift 2 ;;
    --build-arg) build_args+=(--build-arg "${2:?--build-arg needs K=V}"); shift 2 ;;
    --dry-run) dry=1; shift ;;   # print the build command, run nothing
    -h|--help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

case "$target" in runtime|worker) ;; *) die "--target '$target': expected runtime or worker" ;; esac

if [ -z "$engine" ]; then
  # Prefer a docker CLI that actually reaches a daemon; else podman (daemonless); else docker.
  if [ "$dry" = 1 ]; then engine=docker
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null 2>&1; then engine=podman
  elif command -v docker >/dev/null 2>&1; then engine=docker
  else die "neither docker nor podman is on PATH (install one, or pass --engine)"; fi
fi
case "$engine" in docker|podman) ;; *) die "--engine '$engine': expected docker or podman" ;; esac
[ "$dry" = 1 ] || command -v "$engine" >/dev/null 2>&1 || die "--engine $engine: '$engine' is not on PATH"

for f in "$ca_bundle" "$pip_conf"; do
  [ -z "$f" ] || [ -r "$f" ] || die "'$f' is not a readable file (--ca-bundle / --pip-conf)"
done

# Both secrets are always passed (empty when not given): the Dockerfile tests for a non-empty
# file, and older buildah versions reject a secret mount whose id was never provided.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
: > "$tmp/empty"
secret_args=(
  --secret "id=ca_bundle,src=${ca_bundle:-$tmp/empty}"
  --secret "id=pip_conf,src=${pip_conf:-$tmp/empty}"
)

version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/pyproject.toml" | head -n1)"
revision="$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [ "$revision" != unknown ] && [ -n "$(git -C "$root" status --porcelain 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi

if [ "$cpu" = 1 ]; then
  base_image="${base_image:-python:3.11-slim-bookworm}"
  build_args+=(--build-arg TORCH_VARIANT=cpu)
fi
[ -z "$base_image" ] || build_args+=(--build-arg "BASE_IMAGE=$base_image")

if [ -z "$tag" ]; then
  suffix=""; [ "$cpu" = 1 ] && suffix="-cpu"
  name="gptpipe"; [ "$target" = worker ] && name="gptpipe-worker"
  tag="$name:$version$suffix"
fi

cmd=("$engine" build --file "$here/Dockerfile" --target "$target" --tag "$tag"
     --build-arg "VERSION=$version" --build-arg "GIT_REVISION=$revision"
     "${build_args[@]}" "${secret_args[@]}")
[ "$engine" = podman ] && cmd+=(--format docker)   # keep LABEL/HEALTHCHECK semantics of docker
cmd+=("${extra[@]}" "$root")

echo "+ ${cmd[*]}" >&2
[ "$dry" = 0 ] || exit 0
if [ "$engine" = docker ]; then DOCKER_BUILDKIT=1 "${cmd[@]}"; else "${cmd[@]}"; fi
echo "built $tag ($engine, target $target)" >&2
