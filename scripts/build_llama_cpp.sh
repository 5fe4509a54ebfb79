#!/usr/bin/env bash
# Builds llama.cpp's own programs (llama-batched-bench, llama-server, llama-perplexity, llama-cli), the peer
# the benchmarks compare llama_fast with, from the llama.cpp sources vendored in the llama-cpp-python sdist
# (the same llama.cpp that the `[bench]` binding runs), into
#   ${LLAMA_FAST_CACHE_DIR:-~/.cache/llama_fast}/llama.cpp/<llama-cpp-python version>/bin
# Built once: a later run finds the programs and only prints that folder (the last line of output).
# `build_llama_cpp.sh --where` prints that folder and builds nothing (benchmarks/llama_cpp_bin.py asks it).
# Static binaries (no libllama.so to find), tuned for this CPU (GGML_NATIVE), built under `nice` on -j2
# since the cores may be shared: about 15-25 minutes on 2 cores.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# The llama-cpp-python release pinned by setup.py's [bench] extra: the programs and the binding run the
# same llama.cpp. Its sdist carries the sources in vendor/llama.cpp.
version=$(grep -oE "llama-cpp-python==[0-9][0-9.]*" "$repo/setup.py" | head -n 1 | cut -d= -f3 || true)
programs=(llama-batched-bench llama-server llama-perplexity llama-cli)
cache=${LLAMA_FAST_CACHE_DIR:-$HOME/.cache/llama_fast}
if [ "$cache" = none ]; then          # the model cache may be off; the build still needs a home
    cache=$HOME/.cache/llama_fast
fi
root=$cache/llama.cpp/$version
bin=$root/bin

fail() { echo "build_llama_cpp.sh: error: $*" >&2; exit 1; }
[ -n "$version" ] || fail "no llama-cpp-python==VERSION pin found in $repo/setup.py"
case "${1:-}" in
    "") ;;
    --where) echo "$bin"; exit 0 ;;
    *) fail "unknown argument ${1} (usage: build_llama_cpp.sh [--where])" ;;
esac

step() { echo "[build_llama_cpp] $*"; }

all_built() {
    local p
    for p in "${programs[@]}"; do
        [ -x "$bin/$p" ] || return 1
    done
}

if all_built; then
    step "already built (found ${programs[*]})"
    echo "$bin"
    exit 0
fi

command -v cmake >/dev/null || fail "cmake not found (install it, e.g. apt-get install cmake)"
command -v c++ >/dev/null || fail "no C++ compiler found (install one, e.g. apt-get install g++)"
py=${PYTHON:-python3}
if [ -x "$repo/.venv/bin/python" ]; then
    py=$repo/.venv/bin/python
fi
"$py" -m pip --version >/dev/null 2>&1 || fail "pip not found for $py (set PYTHON to a python with pip)"
jobs=${MAX_JOBS:-2}

mkdir -p "$root"
sdist=$root/llama_cpp_python-$version.tar.gz
if [ ! -f "$sdist" ]; then
    step "downloading the llama-cpp-python $version source (sdist, ~75 MB) for its vendored llama.cpp;"
    step "  pip prepares its metadata too, about a minute"
    tmp=$(mktemp -d "$root/download.XXXXXX")
    if ! "$py" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp" \
            >"$tmp/pip.log" 2>&1; then
        fail "pip could not download llama-cpp-python==$version ($(tail -n 1 "$tmp/pip.log"))"
    fi
    mv "$tmp/llama_cpp_python-$version.tar.gz" "$sdist"
    rm -rf "$tmp"
fi

src=$root/src
if [ ! -f "$src/CMakeLists.txt" ]; then
    step "unpacking vendor/llama.cpp from the sdist into $src"
    rm -rf "$src" "$root/unpack"
    mkdir -p "$root/unpack"
    tar -xzf "$sdist" -C "$root/unpack" "llama_cpp_python-$version/vendor/llama.cpp" \
        || fail "could not unpack $sdist (delete it and run again)"
    mv "$root/unpack/llama_cpp_python-$version/vendor/llama.cpp" "$src"
    rm -rf "$root/unpack"
fi
rm -f "$src/.git"   # a submodule pointer to a .git folder the sdist lacks: cmake's git queries fail on it

build=$root/build
. "$repo/scripts/llama_cpp_flags.sh"
step "configuring with cmake (Release, GGML_NATIVE=ON: tuned for this CPU, AMX off; static; no curl, no HTTPS,"
step "  no web UI download: nothing is fetched during the build)"
CFLAGS="$LLAMA_CPP_CFLAGS" CXXFLAGS="$LLAMA_CPP_CFLAGS" nice -n 10 cmake -S "$src" -B "$build" -G "Unix Makefiles" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DGGML_CCACHE=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    >"$root/cmake-configure.log" 2>&1 \
    || fail "cmake configure failed; see $root/cmake-configure.log ($(tail -n 1 "$root/cmake-configure.log"))"
# What the CPU backend was compiled for (GGML_NATIVE: -march=native, so AVX-512 where the CPU has it).
grep -iE "CPU backend|ggml-cpu|GGML_NATIVE|x86 detected|Adding CPU" "$root/cmake-configure.log" \
    | sed 's/^/[build_llama_cpp]   cmake: /' || true

step "compiling with -j$jobs under nice: about 15-25 minutes on 2 shared cores, most of it in the first"
step "  program (the ggml and llama libraries); progress in $root/cmake-build.log"
: >"$root/cmake-build.log"
for p in "${programs[@]}"; do
    start=$(date +%s)
    if ! nice -n 10 cmake --build "$build" --config Release -j "$jobs" --target "$p" >>"$root/cmake-build.log" 2>&1; then
        fail "compiling $p failed; see $root/cmake-build.log ($(grep -m1 -iE 'error' "$root/cmake-build.log" || tail -n 1 "$root/cmake-build.log"))"
    fi
    step "  $p compiled ($(( ($(date +%s) - start) / 60 )) min)"
done

# Copy into bin/ last, through a temporary folder, so an interrupted build never looks finished.
rm -rf "$root/bin.tmp"
mkdir -p "$root/bin.tmp"
for p in "${programs[@]}"; do
    cp "$build/bin/$p" "$root/bin.tmp/$p"
    "$root/bin.tmp/$p" --help >/dev/null 2>&1 || fail "$p was built but does not run ($root/bin.tmp/$p --help)"
done
rm -rf "$bin"
mv "$root/bin.tmp" "$bin"
step "checked that each program runs (--help); built as:"
"$bin/llama-cli" --version 2>&1 | sed 's/^/[build_llama_cpp]   /' || true
features=$(echo | c++ -march=native -dM -E - | grep -oE '__(AVX512[A-Z0-9]*|AVX2|AVXVNNI|FMA|F16C|AMX_[A-Z0-9]*)__' \
    | sed 's/^__//; s/__$//' | sort -u | tr '\n' ' ' || true)
step "its CPU code was compiled with -march=native, which on this CPU enables: ${features:-no AVX2/AVX-512}"
step "the programs are in:"
echo "$bin"
