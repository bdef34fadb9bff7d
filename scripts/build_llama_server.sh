#!/usr/bin/env bash
# Build llama.cpp's llama-server once, from the llama.cpp sources vendored in
# the llama-cpp-python sdist, and install it as DEST_DIR/bin/llama-server.
#
# Usage: scripts/build_llama_server.sh [DEST_DIR]
#   DEST_DIR  install prefix, default .cache/llama.cpp under the repo root;
#             a relative path is taken from the current directory.
# Environment: PYTHON  interpreter whose pip downloads the sdist (default python3).
# Needs cmake, make, g++ (Debian 12 apt packages) and access to PyPI.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${1:-$repo_root/.cache/llama.cpp}"
python="${PYTHON:-python3}"
server="$dest_dir/bin/llama-server"

log() { echo "build_llama_server: $*" >&2; }

if [[ -x "$server" ]] && "$server" --version >/dev/null 2>&1; then
    log "cached: $server"
    exit 0
fi

for tool in cmake make g++ "$python"; do
    if ! command -v "$tool" >/dev/null; then
        log "error: $tool not found; install it (apt-get install cmake make g++) and retry"
        exit 1
    fi
done

mkdir -p "$dest_dir/bin"
# The work dir sits next to the destination, so the final mv is a rename on
# one filesystem. That rename is atomic, so an interrupted build leaves no partial binary.
work_dir="$(mktemp -d "$dest_dir/build.XXXXXX")"
trap 'rm -rf "$work_dir"' EXIT

# --no-binary names only llama-cpp-python because ":all:" fetches the same file
# but also builds pip's metadata-preparation backend from source (55 s against
# 6 s, measured once on a 2-core VM).
log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
"$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work_dir/sdist"
tar -xzf "$work_dir"/sdist/llama_cpp_python-*.tar.gz -C "$work_dir"
src_dir="$(echo "$work_dir"/llama_cpp_python-*/vendor/llama.cpp)"

# GGML_NATIVE=ON compiles for this CPU (-march=native), which is faster than
# the portable baseline. That is safe because DEST_DIR is a per-machine cache
# built where it runs, but a copy moved to an older CPU can die with SIGILL.
# The UI options keep the build offline, because by default it downloads the
# web UI from Hugging Face. OpenSSL only adds HTTPS model downloads and TLS
# serving, and the server here loads a local file and listens on plain HTTP.
# LLAMA_CURL is deprecated and ignored by this llama.cpp version, so passing it is harmless.
log "configuring $src_dir"
cmake -S "$src_dir" -B "$work_dir/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >"$work_dir/cmake.log" 2>&1 ||
    { cat "$work_dir/cmake.log" >&2; exit 1; }

log "compiling llama-server with $(nproc) jobs"
cmake --build "$work_dir/build" --target llama-server -j"$(nproc)" >"$work_dir/make.log" 2>&1 ||
    { tail -n 50 "$work_dir/make.log" >&2; exit 1; }

built="$work_dir/build/bin/llama-server"
# With static llama/ggml libraries, only system libraries should remain.
if ldd "$built" | grep -E "not found|$work_dir" >&2; then
    log "error: $built links to libraries that are not installed system-wide"
    exit 1
fi
"$built" --version >/dev/null 2>&1 || { log "error: built binary fails --version"; exit 1; }

mv -f "$built" "$server"
log "installed $server"
