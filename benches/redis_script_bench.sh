#!/usr/bin/env bash
# Redis's own time per announce in tracker/src/peer_store/announce.lua, alone on a scratch
# redis-server (loopback, no persistence): one zoned leecher re-announcing to a swarm of 40
# peers, the shape of tracker_bench's swarms, with the answer a replica's copy gives (`none`)
# and with numwant=50 drawn in Redis (`draw`). Compares git revisions of the script, each
# measured twice, alternating; revisions before the batched script (ARGV layout of 8 shared
# arguments and 10 per announce) cannot be run by this version.
#
#   benches/redis_script_bench.sh [REV ...]     # default: HEAD
#
# Prints requests/s (redis-benchmark, 16 connections, 100k calls of one announce each) and
# EVALSHA usec_per_call (INFO commandstats). Needs redis-server and redis-benchmark
# (apt-get install redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
revs=("${@:-HEAD}")
for tool in redis-server redis-benchmark redis-cli; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install -y redis-server" >&2; exit 2; }
done

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  --dir "$dir" >"$dir/log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$dir"' EXIT
cli() { redis-cli -p "$port" "$@"; }
for _ in $(seq 50); do cli PING >/dev/null 2>&1 && break; sleep 0.1; done

now=$(($(date +%s) * 1000))
# ARGV as announce.lua documents it, one announce per call; the peer TTL is ten minutes, so
# nothing expires.
hash=0123456789abcdef0123456789abcdef01234567
call_args() { # member ip role zone record numwant answer -> ARGS
  ARGS=(0 600000 100000 100000 1000 604800000 "" bench 1
    "$hash" "$1" "$2" "" "$3" "$4" "$5" "$now" "$6" "$7")
}
for rev in "${revs[@]}"; do
  git show "$rev:tracker/src/peer_store/announce.lua" >"$dir/$rev.lua"
done
for round in 1 2; do
  for rev in "${revs[@]}"; do
    for answer in none draw; do
      cli FLUSHALL >/dev/null
      sha=$(cli SCRIPT LOAD "$(cat "$dir/$rev.lua")")
      for i in $(seq 1 40); do
        call_args "peer$i@127.0.0.$i" "127.0.0.$i" L "dc1/r$((i % 2))" \
          "L|dc1/r$((i % 2))|127.0.0.$i:6881|peer$i|0|0|10" 0 none
        cli EVALSHA "$sha" "${ARGS[@]}" >/dev/null
      done
      call_args peer1@127.0.0.1 127.0.0.1 L dc1/r1 "L|dc1/r1|127.0.0.1:6881|peer1|0|0|10" 50 "$answer"
      # A script that fails answers {-1, why} fast: time only one that answers.
      reply=$(cli EVALSHA "$sha" "${ARGS[@]}")
      if [ "$(head -1 <<<"$reply")" != 0 ]; then
        echo "$rev answer=$answer: the script failed: $reply" >&2
        exit 1
      fi
      cli CONFIG RESETSTAT >/dev/null
      rps=$(redis-benchmark -p "$port" -n 100000 -c 16 -q EVALSHA "$sha" "${ARGS[@]}" 2>&1 | tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1)
      usec=$(cli INFO commandstats | grep '^cmdstat_evalsha:' | grep -o 'usec_per_call=[0-9.]*')
      echo "round $round  $rev  answer=$answer  $rps  $usec"
    done
  done
done
