#!/bin/sh
# System packages the tests need: Debian's chromium for the monitor page's browser test,
# redis-server for the replicas' shared state, and nginx, which tests/test_deploy.py runs with
# deploy/nginx-tls.conf in front of a balancer.
# Idempotent: a no-op when everything is present; otherwise one apt-get update, then install.
set -eu

missing=""
# The browser test runs /usr/bin/chromium (Debian's package), not whatever is on PATH.
[ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
# /usr/sbin is not on every user's PATH: look where Debian's package puts it, as the test does.
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing="$missing nginx"

if [ -z "$missing" ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: missing:$missing (no apt-get here; install them by hand)" >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi

echo "install-test-deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086  # $missing is a list of package names
$sudo apt-get install -y -qq --no-install-recommends $missing
