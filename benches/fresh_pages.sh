#!/usr/bin/env bash
# What it costs this machine to write a package's bytes into tmpfs pages, by where the pages
# come from: memory left idle for a while, memory freed a moment ago, or pages already there
# (an overwrite: the copy alone). Every contender in the swarm bench writes each host's copy
# into fresh tmpfs pages, so this is a floor under every contender's CPU there.
#
# On a VM that reports free memory to its host (virtio-balloon free page reporting; the
# kernel's page_reporting parameters are printed when present), idle memory is handed back
# and backed again on first touch, which the guest sees as a slow copy.
#
# With --fill GIB it writes GIB files of 1 GiB one after another, keeping them all until the
# end, and times each: how much new memory the machine gives at the speed of a copy before it
# slows down. A swarm run writes N+2 copies of its package (the CPU mode at 1 GiB: about 10
# GiB), and a contender whose writes fall past that point pays for it.
#
# usage: benches/fresh_pages.sh [MiB (default 2048)] [idle seconds (default 20)]
#        benches/fresh_pages.sh --fill GIB
# Writes only under /dev/shm, in a directory it removes.
set -euo pipefail

dir=$(mktemp -d /dev/shm/fbpkg-fresh-pages.XXXXXX)
trap 'rm -rf "$dir"' EXIT

for p in /sys/module/page_reporting/parameters/page_reporting_order \
    /sys/module/page_reporting/parameters/min_free_ms \
    /sys/module/page_reporting/parameters/reported_kib; do
    [[ -r $p ]] && echo "$(basename "$p"): $(cat "$p")"
done

if [[ ${1:-} == --fill ]]; then
    gib=${2:?usage: $0 --fill GIB}
    [[ $gib =~ ^[0-9]+$ && $gib -ge 1 && $gib -le 16 ]] || {
        echo "$0: --fill takes 1 to 16 (GiB)" >&2
        exit 2
    }
    for i in $(seq "$gib"); do
        start=$EPOCHREALTIME
        dd if=/dev/zero of="$dir/f$i" bs=1M count=1024 status=none
        end=$EPOCHREALTIME
        awk -v i="$i" -v s="$start" -v e="$end" \
            'BEGIN { printf "GiB %2d: %6.2f s\n", i, e - s }'
    done
    exit 0
fi

mib=${1:-2048}
idle=${2:-20}

# write LABEL [dd flags...]: time one write of $mib MiB of zeros into $dir/f.
write() {
    local label=$1 start end
    shift
    start=$EPOCHREALTIME
    dd if=/dev/zero of="$dir/f" bs=1M count="$mib" status=none "$@"
    end=$EPOCHREALTIME
    awk -v l="$label" -v s="$start" -v e="$end" -v m="$mib" \
        'BEGIN { printf "%-28s %6.2f s  %5.2f s/GiB\n", l ":", e - s, (e - s) * 1024 / m }'
}

sleep "$idle"
write "after ${idle} s idle"
write "overwrite (copy only)" conv=notrunc
rm "$dir/f"
write "just freed"
rm "$dir/f"
sleep "$idle"
write "after ${idle} s idle, again"
