#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-batched-bench, llama-lookup and
# llama-speculative natively, from the llama.cpp sources vendored in the
# llama-cpp-python sdist, so that benchmarks/compare.py and
# benchmarks/speculative.py can run cholla and llama.cpp on the same GGUF files.
#
#   benchmarks/build_llama_cpp.sh DIR
#
# DIR gets the extracted sources, a cmake build folder, and DIR/bin with the
# binaries (statically linked to ggml/llama, so they can be moved).
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default 0.3.36)
#   LLAMA_SDIST               an already downloaded sdist (.tar.gz); skips pip download
#   JOBS                      parallel build jobs (default: nproc)
#   NICE                      niceness of the build (default 10)
#
# Release, GGML_NATIVE=ON (AVX-512 / AMX where the CPU has them), no CUDA,
# no curl / openssl.  GCC 12 miscompiles the AMX tile configuration in
# ggml/src/ggml-cpu/amx/mmq.cpp (the stores that fill the tile_config_t are
# dropped before _tile_loadconfig reads it), so a compiler barrier is put
# before each _tile_loadconfig call.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-$(nproc)}
NICE=${NICE:-10}

if [ -n "${LLAMA_SDIST:-}" ]; then
    SDIST=$LLAMA_SDIST
else
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    python -m pip download "llama-cpp-python==$VERSION" --no-deps \
        --no-binary :all: -d "$TMP"
    SDIST=$(ls "$TMP"/llama_cpp_python-*.tar.gz)
fi

echo "== extracting $SDIST into $DIR"
tar xzf "$SDIST" -C "$DIR"
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "no llama.cpp sources at $SRC" >&2; exit 1; }

echo "== compiler barrier before _tile_loadconfig (GCC 12 AMX miscompile)"
python - "$SRC/ggml/src/ggml-cpu/amx/mmq.cpp" <<'EOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
barrier = 'asm volatile("" ::: "memory");'
# Idempotent: only calls that do not already follow a barrier.
out, n, pos = [], 0, 0
for m in re.finditer(r'^([ \t]*)_tile_loadconfig\(', src, re.M):
    before = src[:m.start()].rstrip()
    out.append(src[pos:m.start()])
    if not before.endswith(barrier):
        out.append(m.group(1) + barrier + '\n')
        n += 1
    pos = m.start()
out.append(src[pos:])
open(path, 'w').write(''.join(out))
total = len(re.findall(r'_tile_loadconfig\(', src))
print(f"{path}: {total} _tile_loadconfig call(s), {n} barrier(s) inserted")
if total == 0:
    sys.exit("no _tile_loadconfig call found; the sources changed, check the patch")
EOF

BUILD="$DIR/build"
echo "== configure ($BUILD)"
cmake -S "$SRC" -B "$BUILD" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON

# llama-lookup and llama-speculative are examples (hence LLAMA_BUILD_EXAMPLES=ON);
# only the targets named here are built.
TARGETS="llama-bench llama-batched-bench llama-lookup llama-speculative"
echo "== build $TARGETS (-j$JOBS, nice $NICE)"
# shellcheck disable=SC2086
nice -n "$NICE" cmake --build "$BUILD" --config Release -j"$JOBS" --target $TARGETS

mkdir -p "$DIR/bin"
echo "== done"
for target in $TARGETS; do
    cp "$BUILD/bin/$target" "$DIR/bin/"
    echo "$DIR/bin/$target"
done
