#!/usr/bin/env bash
# The upload queue of some swarm_bench hosts while a scenario runs: once a second, the backlog
# (bytes, packets) and drops of the upload tbf (or, with `--queue small-first`, the root htb,
# which sums its two queues) in each named host's namespace (fbsb-HOST,
# device eth0: NS_PREFIX and HOST_DEV in benches/src/swarm/netplan.rs, which the bench's own
# `host_tbf_bytes` reads the same way), then the median backlog over a window of the run.
#
#   benches/tbf_backlog.sh OUT "l003 l006 l001 l002" -- \
#       target/release/swarm_bench --scenario b3 --contenders fbpkg-rs --rate-scale 0.25
#
# OUT gets one line per sample: unix time, then HOST BYTES PACKETS DROPS for each host. The
# median is over samples from FROM to TO seconds after the first (env FROM=40 TO=150). Runs the
# command given after --, as root like the bench; samples stop when it exits (at most 1 hour),
# and the script exits with its status.
# Reads only the bench's own namespaces.
set -euo pipefail
out=${1:?usage: $0 OUT "HOSTS" -- COMMAND...}
hosts=${2:?usage: $0 OUT "HOSTS" -- COMMAND...}
shift 2
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "usage: $0 OUT \"HOSTS\" -- COMMAND..." >&2; exit 2; }
: >"$out"
"$@" &
bench=$!
first=${hosts%% *}
for _ in $(seq 1 3600); do
    kill -0 "$bench" 2>/dev/null || break
    if ip netns list | grep -q "^fbsb-$first\b"; then
        line=$(date +%s.%N | cut -c1-14)
        for h in $hosts; do
            q=$(tc -n "fbsb-$h" -s -j qdisc show dev eth0 2>/dev/null | python3 -c '
import json, sys
try:
    q = [q for q in json.load(sys.stdin)
         if q["kind"] == "tbf" or (q["kind"] == "htb" and q.get("root"))][0]
    print(q["backlog"], q["qlen"], q["drops"])
except Exception:
    print("- - -")') || q="- - -"
            line="$line $h $q"
        done
        echo "$line" >>"$out"
    fi
    sleep 1
done
status=0
wait "$bench" || status=$?
python3 - "$out" "${FROM:-40}" "${TO:-150}" <<'PY'
import statistics, sys
path, lo, hi = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows = [l.split() for l in open(path) if l.strip()]
if not rows:
    sys.exit("no samples: did the bench create its namespaces?")
t0 = float(rows[0][0])
hosts = rows[0][1::4]
for k, h in enumerate(hosts):
    vals = [int(r[2 + 4 * k]) for r in rows
            if r[2 + 4 * k] != "-" and lo < float(r[0]) - t0 < hi]
    if vals:
        print(f"{h}: backlog median {statistics.median(vals) / 1000:.0f} KB, "
              f"max {max(vals) / 1000:.0f} KB over {len(vals)} samples")
    else:
        print(f"{h}: no samples in the window")
PY
exit "$status"
