#!/usr/bin/env bash
# Bootstraps everything `bench/run.py` needs for the full run, idempotently:
#   - bench/.venv: its own environment (never the project's .venv), with llamacpp-ha installed
#     editable, the Python contenders and matplotlib, all pinned to exact versions;
#   - Debian's nginx, haproxy and redis-server (the replicas section), and valgrind
#     (bench/instructions.py), when missing.
# Nothing here is fatal: a contender that cannot be installed is reported, its log kept under
# bench/.venv/setup-logs/, and run.py records it as unavailable with that reason.
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=bench/.venv
LOGS=$VENV/setup-logs
# Exact pins: a benchmark that silently upgrades its peers is not reproducible.
SGLANG_ROUTER=sglang-router==0.3.2
# 1.106.12: the newest release tried whose [proxy] extra resolves from PyPI here (1.108.14 and
# 1.110.2 pin litellm-proxy-extras / litellm-proxy releases the index does not serve).
LITELLM='litellm[proxy]==1.106.12'
MATPLOTLIB=matplotlib==3.11.2

note() { printf 'bench/setup.sh: %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    note "creating $VENV"
    "$PYTHON" -m venv "$VENV" || { note "cannot create $VENV with $PYTHON"; exit 1; }
fi
mkdir -p "$LOGS"

# pip_install NAME STAMP-KEY ARGS...: installs once per distinct set of pins (the stamp).
pip_install() {
    local name=$1 key=$2
    shift 2
    local stamp="$VENV/.stamp-$name"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        return 0
    fi
    note "installing $name ($key)"
    if "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >"$LOGS/$name.log" 2>&1; then
        echo "$key" >"$stamp"
        rm -f "$LOGS/$name.failed"
    else
        note "could not install $name; see $LOGS/$name.log (last lines below)"
        tail -n 5 "$LOGS/$name.log"
        touch "$LOGS/$name.failed"
    fi
}

pyproject_key=$(cksum pyproject.toml | cut -d' ' -f1)
pip_install project "editable-$pyproject_key" -e .
pip_install matplotlib "$MATPLOTLIB" "$MATPLOTLIB"
pip_install sglang-router "$SGLANG_ROUTER" "$SGLANG_ROUTER"
pip_install litellm "$LITELLM" "$LITELLM"

apt_updated=0
apt_install() {
    local cmd=$1 pkg=$2
    if command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ]; then
        rm -f "$LOGS/$pkg.failed"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        note "apt-get not found: cannot install $pkg" | tee "$LOGS/$pkg.log"
        touch "$LOGS/$pkg.failed"
        return 0
    fi
    if [ "$apt_updated" = 0 ]; then
        note "apt-get update"
        apt-get update >"$LOGS/apt-update.log" 2>&1 || note "apt-get update failed; see $LOGS/apt-update.log"
        apt_updated=1
    fi
    note "installing $pkg with apt-get"
    # The packages' own init scripts may try to start a system-wide daemon; the benchmark runs
    # its own instances with private config files, so a failing service start is harmless.
    if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg" \
        >"$LOGS/$pkg.log" 2>&1 || command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ]; then
        rm -f "$LOGS/$pkg.failed"
    else
        note "could not install $pkg; see $LOGS/$pkg.log"
        tail -n 5 "$LOGS/$pkg.log"
        touch "$LOGS/$pkg.failed"
    fi
}
apt_install nginx nginx
apt_install haproxy haproxy
apt_install redis-server redis-server
apt_install valgrind valgrind  # bench/instructions.py (make bench-instructions)

note "done"
exit 0
