#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what the tests need, then cargo test.
#
#   scripts/test.sh              # everything
#   scripts/test.sh -p fbpkg-common   # extra arguments go to cargo test
#
# Needs: Debian's chromium (the dashboard is checked in a real headless browser). Installed
# here with apt-get when running as root; otherwise it says what to install. The interop tests
# also want aria2, qBittorrent, Transmission and opentracker (scripts/interop-deps.sh, run here;
# without root they are skipped with a message).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test.sh: installing chromium (dashboard browser test)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "scripts/test.sh: the dashboard test needs Chromium: sudo apt-get install chromium" >&2
        exit 1
    fi
fi

# Optional: the run test checks under strace that a cached launch opens no socket.
if ! command -v strace >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing strace (run's no-socket check)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null || true
fi

scripts/interop-deps.sh

exec cargo test --workspace "$@"
