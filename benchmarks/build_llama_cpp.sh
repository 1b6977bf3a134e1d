#!/usr/bin/env bash
# Build llama.cpp's CLI tools (llama-simple, llama-bench, llama-quantize, llama-tokenize) so that
# gptpipe's GGUF can be run, quantized and timed in the runtime it is meant for. No C/C++ package
# registry is reachable here, but the llama-cpp-python sdist on PyPI vendors llama.cpp's source
# under vendor/llama.cpp, so this downloads that sdist and builds the tools from it.
#
#   benchmarks/build_llama_cpp.sh            # newest llama-cpp-python on the index
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 benchmarks/build_llama_cpp.sh
#
# Built and run so far: llama-cpp-python 0.3.36 (llama.cpp commit 0c1e570), 378 s on 2 cores.
#
# Binaries go to $GPTPIPE_LLAMA_CPP (default ~/.cache/gptpipe/llama.cpp/bin), outside git; the
# sdist and build tree sit next to it. Idempotent: a bin dir whose VERSION file names the version
# asked for and holds every tool is left alone. Static libraries, so the copied binaries carry
# no rpath into the build tree. GGML_NATIVE: the binaries are for this machine's CPU only.
# 6-10 minutes on 2 cores (GPTPIPE_LLAMA_CPP_JOBS sets the parallelism); pip is $PYTHON's, else the
# repository's .venv's, else python3's.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
[ -n "${PYTHON:-}" ] || [ ! -x "$root/.venv/bin/python" ] || python="$root/.venv/bin/python"  # the Makefile's venv
bin="${GPTPIPE_LLAMA_CPP:-$HOME/.cache/gptpipe/llama.cpp/bin}"
work="$(dirname "$bin")"
jobs="${GPTPIPE_LLAMA_CPP_JOBS:-2}"
tools=(llama-simple llama-bench llama-quantize llama-tokenize)

say() { echo "build_llama_cpp: $*"; }
die() { echo "build_llama_cpp: $*" >&2; exit 1; }

command -v cmake >/dev/null || die "cmake not found (apt-get install cmake)"
command -v c++ >/dev/null || die "no C++ compiler found (apt-get install g++)"

version="${LLAMA_CPP_PYTHON_VERSION:-}"
if [ -z "$version" ]; then
  # `pip index versions` prints "llama-cpp-python (X.Y.Z)" first: the newest on the index.
  version="$("$python" -m pip index versions llama-cpp-python 2>/dev/null |
    sed -n 's/^llama-cpp-python (\(.*\))$/\1/p' | head -n 1)"
  [ -n "$version" ] || die "could not ask the package index for llama-cpp-python's versions"
fi
say "llama-cpp-python $version -> $bin"

if [ -f "$bin/VERSION" ] && [ "$(head -n 1 "$bin/VERSION")" = "llama-cpp-python $version" ]; then
  missing=0
  for t in "${tools[@]}"; do [ -x "$bin/$t" ] || missing=1; done
  if [ "$missing" = 0 ]; then
    say "already built: $(tr '\n' ' ' < "$bin/VERSION")"
    exit 0
  fi
fi

sdist_dir="$work/sdist"
src="$work/llama_cpp_python-$version"
mkdir -p "$sdist_dir"
sdist="$sdist_dir/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  say "downloading the sdist: pip download --no-binary :all: --no-deps llama-cpp-python==$version"
  "$python" -m pip download --no-binary :all: --no-deps \
    "llama-cpp-python==$version" -d "$sdist_dir" >/dev/null
fi
[ -f "$sdist" ] || die "pip did not leave $sdist"
if [ ! -d "$src/vendor/llama.cpp" ]; then
  say "extracting $sdist"
  tar -xzf "$sdist" -C "$work"
fi
llama="$src/vendor/llama.cpp"
[ -f "$llama/CMakeLists.txt" ] || die "$sdist has no vendor/llama.cpp/CMakeLists.txt"

start=$(date +%s)
say "cmake configure in $llama/build"
cmake -S "$llama" -B "$llama/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >/dev/null
say "cmake --build -j$jobs --target ${tools[*]}"
cmake --build "$llama/build" -j"$jobs" --target "${tools[@]}"
seconds=$(( $(date +%s) - start ))

mkdir -p "$bin"
for t in "${tools[@]}"; do install -m 0755 "$llama/build/bin/$t" "$bin/$t"; done
{
  echo "llama-cpp-python $version"
  # llama.cpp's own version line: the sdist carries its shallow git dir, so the commit is real
  # and the build number is 1.
  "$bin/llama-bench" --version 2>&1 | head -n 1 || true
  echo "built in ${seconds}s with -j$jobs on $(uname -m), GGML_NATIVE=ON"
} > "$bin/VERSION"
say "installed ${tools[*]} into $bin ($(sed -n 2p "$bin/VERSION"); ${seconds}s)"
