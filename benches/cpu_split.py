#!/usr/bin/env python3
"""Where each contender's CPU goes in swarm_bench's CPU mode, from a `perf record -a` of it.

The CPU target compares CPU seconds per GiB delivered with librqbit's in the same run. Part of
both is work any client must do for the same bytes: copy every downloaded byte into new tmpfs
pages (`copy_folio_from_iter_atomic`, under `pwrite`, and `shmem_write_end`), hash it with
SHA-1 (BitTorrent's piece check), and copy it out of the kernel and into it (`_copy_to_iter`:
socket reads and page-cache reads; `_copy_from_iter`: socket writes). fbpkg-rs also takes the
SHA-256 of the whole archive, the package's identity. This prints, for each contender's run in
the recording, its sampled CPU seconds, those parts, and the floor they set: if the work
librqbit also does costs more than half of librqbit's total, no client doing it meets 0.5x.

    perf record -a -F 499 -o cpu.perf -- target/release/swarm_bench --scenario none --cpu \\
        --cpu-size 1G --cpu-rounds 2 --contenders fbpkg-rs,librqbit
    perf script -i cpu.perf -F pid,comm,time,ip,sym,dso | benches/cpu_split.py

Samples are attributed by process: fbpkg-rs's are those of processes running the fbpkg-rs
binary (agents, tracker, CLI); librqbit's, those of the bench's child processes that run its
sessions (the bench binary's name, other than the first process recorded: the bench itself).
A contender's run is its processes whose lifetimes overlap. At -F 499 a sample is ~2 ms; the
sampled seconds match the bench's CPU column to within a few tenths.
"""

import argparse
import collections
import re
import signal
import sys

LINE = re.compile(r"\s*(.+?)\s+(\d+)\s+([\d.]+):\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")

# Work every contender does for the same bytes, then fbpkg-rs's own.
COMMON = [
    ("new pages", ("copy_folio_from_iter_atomic", "shmem_write_end")),
    ("SHA-1", ()),
    ("copies out", ("_copy_to_iter",)),
    ("copies in", ("_copy_from_iter",)),
]


def part(sym):
    low = sym.lower()
    if "sha1" in low:
        return "SHA-1"
    if "sha256" in low or "sha2::" in low:
        return "SHA-256"
    for name, syms in COMMON:
        if sym in syms:
            return name
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hz", type=float, default=499, help="perf record's -F (default 499)")
    ap.add_argument("--agent", default="fbpkg-rs", help="the agent binary's name (prefix)")
    ap.add_argument("--bench", default="swarm_bench", help="the bench binary's name (prefix)")
    args = ap.parse_args()

    procs = {}  # pid -> {comms, dsos, first, last, parts: Counter, n}
    order = []
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, t, sym, dso = m.groups()
        pid, t = int(pid), float(t)
        if pid == 0:
            continue
        p = procs.get(pid)
        if p is None:
            p = procs[pid] = {
                "comms": set(),
                "dsos": set(),
                "first": t,
                "last": t,
                "parts": collections.Counter(),
                "n": 0,
            }
            order.append(pid)
        p["comms"].add(comm)
        p["dsos"].add(dso.rsplit("/", 1)[-1])
        p["last"] = t
        p["n"] += 1
        p["parts"][part(sym)] += 1

    def kind(pid, p):
        if any(d.startswith(args.agent) for d in p["dsos"]) or any(
            c.startswith(args.agent[:15]) for c in p["comms"]
        ):
            return "fbpkg-rs"
        if any(c.startswith(args.bench[:15]) for c in p["comms"]) and pid != bench_pid:
            return "librqbit"
        return None

    bench_pid = next(
        (pid for pid in order if any(c.startswith(args.bench[:15]) for c in procs[pid]["comms"])),
        None,
    )
    runs = []  # [kind, first, last, Counter, n]
    for pid in sorted(procs, key=lambda q: procs[q]["first"]):
        p = procs[pid]
        k = kind(pid, p)
        if k is None:
            continue
        r = next((r for r in runs if r[0] == k and r[1] <= p["first"] <= r[2]), None)
        if r is None:
            runs.append([k, p["first"], p["last"], collections.Counter(), 0])
            r = runs[-1]
        r[2] = max(r[2], p["last"])
        r[3].update(p["parts"])
        r[4] += p["n"]
    runs = [r for r in runs if r[4] / args.hz >= 1.0]
    if not runs:
        sys.exit("cpu_split: no contender's run in the input (perf script -F pid,comm,time,ip,sym,dso)")

    hz = args.hz
    names = [n for n, _ in COMMON]
    print("| run | contender | CPU s sampled | " + " | ".join(names) + " | SHA-256 | floor | rest |")
    print("|---" * (len(names) + 6) + "|")
    for i, (k, first, last, parts, n) in enumerate(runs, 1):
        common = sum(parts[x] for x in names)
        floor = common + parts["SHA-256"]
        cells = [f"{parts[x] / hz:.1f}" for x in names]
        print(
            f"| {i} | {k} | {n / hz:.1f} | " + " | ".join(cells)
            + f" | {parts['SHA-256'] / hz:.1f} | {floor / hz:.1f} | {(n - floor) / hz:.1f} |"
        )
    ours = [r for r in runs if r[0] == "fbpkg-rs"]
    theirs = [r for r in runs if r[0] == "librqbit"]
    print("\nfloor: the columns before it, summed; rest: everything else (TCP/IP, syscalls, the")
    print("runtime, the client's own code)")
    if ours and theirs:
        half = sum(r[4] for r in theirs) / len(theirs) / hz / 2
        floor = sum(sum(r[3][x] for x in names) + r[3]["SHA-256"] for r in ours) / len(ours) / hz
        print(
            f"half of librqbit's mean: {half:.1f} s; fbpkg-rs's mean floor (the work librqbit "
            f"also does, and the SHA-256): {floor:.1f} s, {floor / half:.2f} of it"
        )

if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
