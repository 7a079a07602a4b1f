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
# usage: benches/fresh_pages.sh [MiB (default 2048)] [idle seconds (default 20)]
# Writes only under /dev/shm, in a directory it removes.
set -euo pipefail

mib=${1:-2048}
idle=${2:-20}
dir=$(mktemp -d /dev/shm/fbpkg-fresh-pages.XXXXXX)
trap 'rm -rf "$dir"' EXIT

for p in /sys/module/page_reporting/parameters/page_reporting_order \
    /sys/module/page_reporting/parameters/reported_kib; do
    [[ -r $p ]] && echo "$(basename "$p"): $(cat "$p")"
done

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
