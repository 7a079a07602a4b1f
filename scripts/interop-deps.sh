#!/usr/bin/env bash
# Install the stock BitTorrent clients the interop suite (tests/tests/interop.rs) runs against:
# aria2, qBittorrent (nox), Transmission (cli + daemon) and opentracker, all from Debian.
#
#   scripts/interop-deps.sh        # as root; a no-op when every binary is already there
#
# Without them the interop cells print "skipped: <binary> not installed" and pass, so a
# developer without root can still run the rest of the suite.
#
# Services: transmission-daemon and opentracker ship init scripts and systemd units that would
# start a daemon listening on every address (transmission with DHT and LPD on). The tests start
# their own instances on loopback with a temp profile, so the packages' services must never
# start: while apt runs, a policy-rc.d that refuses every start is put in place (unless the
# machine already has one), and the units are masked when systemd is there.
set -euo pipefail

# binary -> Debian package
declare -A PACKAGE=(
    [aria2c]=aria2
    [qbittorrent-nox]=qbittorrent-nox
    [transmission-daemon]=transmission-daemon
    [transmission-remote]=transmission-cli
    [transmission-create]=transmission-cli
    [opentracker]=opentracker
)

missing=()
for bin in "${!PACKAGE[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("${PACKAGE[$bin]}")
done
if [ "${#missing[@]}" = 0 ]; then
    exit 0
fi
# Unique, sorted.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/interop-deps.sh: the interop tests need: apt-get install ${missing[*]}" \
         "(they skip without them)" >&2
    exit 0
fi

echo "scripts/interop-deps.sh: installing ${missing[*]}" >&2
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/interop-deps.sh: no service starts while it installs\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
if [ -d /run/systemd/system ]; then
    systemctl mask --quiet transmission-daemon.service opentracker.service 2>/dev/null || true
fi

export DEBIAN_FRONTEND=noninteractive
# apt-get update is the slow part: only when the lists are missing, or when installing from
# the lists there fails (they may name versions the mirror no longer has).
install() { apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    apt-get update -qq
fi
if ! install; then
    apt-get update -qq
    install
fi

for bin in "${!PACKAGE[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || {
        echo "scripts/interop-deps.sh: $bin still missing after installing ${PACKAGE[$bin]}" >&2
        exit 1
    }
done
