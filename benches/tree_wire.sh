#!/usr/bin/env bash
# What a tree package's first fetch costs on the wire in a real swarm (issue 13, Must 2):
# a tracker and three agents on loopback; A publishes DIR, B and C fetch it at once; each
# fetcher's bytes received on the wire (blocks as sent, compressed between agents, and the
# blocks the endgame asked of two peers) plus the metainfo every host fetches, against DIR's
# tar.zst as `publish --format tar.zst` makes it, and against that tar.zst package fetched
# the same way (its endgame too).
#
#   benches/tree_wire.sh /usr/lib/python3 [extra publish flags, e.g. --no-dictionary]
#
# Needs target/release/fbpkg-rs (cargo build --release -p fbpkg-peer). Loopback only; every
# process is stopped on exit.
set -euo pipefail
dir=${1:?usage: $0 DIR [publish flags]}
shift
bin=${FBPKG_BIN:-$(dirname "$0")/../target/release/fbpkg-rs}
work=$(mktemp -d /tmp/tree-wire.XXXXXX)
pids=()
cleanup() {
    [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tracker=http://127.0.0.1:$port
host() { echo --tracker "$tracker" --state-dir "$work/$1/state" --cache-dir "$work/$1/cache"; }
"$bin" tracker --listen "127.0.0.1:$port" --data-dir "$work/tracker" >"$work/tracker.log" 2>&1 &
pids+=($!)
for h in a b c; do
    # shellcheck disable=SC2046
    "$bin" agent $(host $h) --listen 127.0.0.1:0 >"$work/$h.log" 2>&1 &
    pids+=($!)
done
# Every service up before the publish: a publish with no agent on its host, or a get with
# none on its own, would not measure a swarm.
ready() {
    for _ in $(seq 100); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "$0: not ready after 10 s: $*" >&2
    return 1
}
ready curl -sf "$tracker/healthz"
for h in a b c; do
    # shellcheck disable=SC2046
    ready "$bin" status $(host $h)
done
# shellcheck disable=SC2046
ref=$("$bin" publish pkg "$dir" "$@" $(host a))
# shellcheck disable=SC2046
"$bin" get "$ref" $(host b) >/dev/null &
getb=$!
pids+=("$getb")
# shellcheck disable=SC2046
"$bin" get "$ref" $(host c) >/dev/null
wait $getb
sha=${ref#pkg:}
meta=$(stat -c %s "$work/a/cache/pkg/$sha/.fbpkg.torrent")
# The same directory as a tar.zst package, fetched by the same two hosts the same way: its
# endgame asks some blocks of two peers too, so the two fetches compare like with like.
# shellcheck disable=SC2046
tref=$("$bin" publish tarpkg "$dir" --format tar.zst $(host a))
tar=$(find "$work/a/cache/tarpkg" -name '*.tar.zst' -printf '%s\n' | head -1)
[ -n "$tar" ] || { echo "$0: no tar.zst in the cache after publish --format tar.zst" >&2; exit 1; }
tmeta=$(stat -c %s "$work/a/cache/tarpkg/${tref#tarpkg:}/.fbpkg.torrent")
# shellcheck disable=SC2046
"$bin" get "$tref" $(host b) >/dev/null &
getb=$!
pids+=("$getb")
# shellcheck disable=SC2046
"$bin" get "$tref" $(host c) >/dev/null
wait $getb
for h in b c; do
    # shellcheck disable=SC2046
    "$bin" status --json $(host $h) | python3 -c "
import json, sys
meta, tmeta, tar = $meta, $tmeta, $tar
got = {t['name']: t for t in json.load(sys.stdin)}
t, z = got['pkg'], got['tarpkg']
wire = t['downloaded_wire'] + meta
twire = z['downloaded_wire'] + tmeta
print(f\"$h: tree {t['downloaded']} bytes of pieces ({t.get('wasted', 0)} more not needed) took \"
      f\"{wire / 2**20:.2f} MiB on the wire with its metainfo, {wire / tar:.3f}x the tar.zst's \"
      f\"{tar / 2**20:.2f} MiB; the tar.zst package took {twire / 2**20:.2f} MiB \"
      f\"({z.get('wasted', 0)} not needed): tree {wire / twire:.3f}x\")"
done
