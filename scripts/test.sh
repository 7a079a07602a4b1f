#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what the tests need, then cargo test.
#
#   scripts/test.sh              # everything
#   scripts/test.sh -p fbpkg-common   # extra arguments go to cargo test
#
# Needs: Debian's chromium (the dashboard is checked in a real headless browser),
# redis-server and postgresql (tracker replicas are tested against real ones). Installed here with apt-get
# when running as root; otherwise it says what to install. The interop tests
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

# Optional: a replica test reads the server's side of PostgreSQL sessions with ss(8).
if ! command -v ss >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing iproute2 (ss, for the locking sessions' keepalives)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null || true
fi

# The Redis peer-store tests start their own redis-server (a free port, no persistence); they
# skip, saying so, without it.
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test.sh: installing redis-server (Redis peer-store tests)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "scripts/test.sh: the Redis peer-store tests skip without redis-server: sudo apt-get install redis-server" >&2
    fi
fi

# The Redis-over-TLS test makes its CA and certificate with the openssl tool; it skips,
# saying so, without it.
if ! command -v openssl >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null || true
fi

# The replica tests create their own PostgreSQL cluster (initdb in a temporary directory, a
# free port; as the `postgres` user when run as root); they skip, saying so, without it.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test.sh: installing postgresql (tracker replica tests)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "scripts/test.sh: the replica tests skip without PostgreSQL: sudo apt-get install postgresql" >&2
    fi
fi

scripts/interop-deps.sh

exec cargo test --workspace "$@"
