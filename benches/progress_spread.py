#!/usr/bin/env python3
"""How evenly a crowd progressed, from a swarm_bench JSON report (`--json out.json`).

For each scenario and contender in the report:

- the spread of the leechers' progress at a few instants (bytes received on the wire over the
  most any leecher received): least / tenth / median / most, and which host had the least;
- the crowd's steady rate (all leechers' wire downloads over a window of the middle of the
  run) and when the crowd would have finished had it kept that rate to the end (`steady
  end`): the finish of a crowd that progressed evenly, to set beside T_mean and T_last;
- for the last hosts to finish, their download / upload in Mbit/s at each sample of their
  last seconds, and their rank (0 = least) at each instant above.

A host that comes last because it fell behind early shows a low rank from the first instants
and takes its last seconds at its downlink's full rate while the others are done; one that
comes last because its last blocks came late shows a median rank and a low rate at the end.

Usage: benches/progress_spread.py out.json [--at 10,20,30] [--last 3] [--window 10,25]
"""

import argparse
import json
import signal
import sys


def nearest(ts, x):
    return min(range(len(ts)), key=lambda k: abs(ts[k] - x))


def report(name, contender, run, at, last, window):
    tl = run.get("timeline")
    if not tl or not tl.get("t"):
        print(f"{name} {contender}: no timeline in the report")
        return
    t = tl["t"]
    leechers = {leecher["host"] for leecher in run.get("leechers", [])}
    hosts = {h: v for h, v in tl["hosts"].items() if h in leechers}
    done = {
        leecher["host"]: leecher["done_secs"]
        for leecher in run.get("leechers", [])
        if leecher.get("done_secs")
    }
    if not hosts or not done:
        print(f"{name} {contender}: no leecher finished")
        return
    full = max(v["down"][-1] for v in hosts.values())
    if full <= 0:
        print(f"{name} {contender}: the leechers received nothing")
        return
    summary = run.get("summary", {})
    print(f"{name} {contender}: T_last {summary.get('t_last_secs', 0):.2f} s, "
          f"T_mean {summary.get('t_mean_secs', 0):.2f} s")

    ranks = {}
    for x in at:
        if x > t[-1]:
            continue
        i = nearest(t, x)
        order = sorted(hosts, key=lambda h: hosts[h]["down"][i])
        frac = [hosts[h]["down"][i] / full * 100 for h in order]
        n = len(frac)
        print(f"  at {t[i]:5.1f} s: least {frac[0]:3.0f}% ({order[0]}), tenth {frac[n // 10]:3.0f}%, "
              f"median {frac[n // 2]:3.0f}%, most {frac[-1]:3.0f}%")
        for rank, h in enumerate(order):
            ranks.setdefault(h, []).append(rank)

    a, b = nearest(t, window[0]), nearest(t, window[1])
    total = lambda i: sum(v["down"][i] for v in hosts.values())
    if t[b] > t[a] and total(b) > total(a):
        rate = (total(b) - total(a)) / (t[b] - t[a])
        end = t[b] + (total(len(t) - 1) - total(b)) / rate
        print(f"  steady rate {rate * 8 / 1e6:.0f} Mbit/s ({t[a]:.0f}-{t[b]:.0f} s), "
              f"steady end {end:.2f} s")

    for h in sorted(done, key=done.get)[max(0, len(done) - last):] if last else []:
        if h not in hosts:
            continue
        v = hosts[h]
        samples = []
        for i in range(1, len(t)):
            if t[i] < done[h] - 5 or t[i] > done[h] + 0.6:
                continue
            dt = t[i] - t[i - 1]
            if dt <= 0:
                continue
            down = (v["down"][i] - v["down"][i - 1]) * 8 / dt / 1e6
            up = (v["up"][i] - v["up"][i - 1]) * 8 / dt / 1e6
            samples.append(f"{t[i]:.1f}:{down:.0f}/{up:.1f}")
        print(f"  {h} done at {done[h]:.2f} s, rank {ranks.get(h, [])}; down/up Mbit/s:")
        print("    " + " ".join(samples))


def seconds_list(text):
    """`10,30` as [10.0, 30.0]; anything else is a usage error, not a traceback."""
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of seconds: {text!r}")
    if not out or any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"want one or more seconds, none negative: {text!r}")
    return out


def window_pair(text):
    out = seconds_list(text)
    if len(out) != 2 or out[0] >= out[1]:
        raise argparse.ArgumentTypeError(f"want two instants, the first earlier: {text!r}")
    return out


def main():
    # Piped into `head`: stop quietly, as other command-line tools do.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="a swarm_bench JSON report")
    p.add_argument("--at", type=seconds_list, default="5,10,20,30",
                   help="instants, in seconds, comma-separated")
    p.add_argument("--last", type=int, default=3, help="how many of the last hosts to show")
    p.add_argument("--window", type=window_pair, default="10,25",
                   help="the window, in seconds, whose rate is the crowd's steady rate")
    args = p.parse_args()
    if args.last < 0:
        p.error("--last cannot be negative")
    try:
        with open(args.report) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"cannot read {args.report}: {e}")
    at, window = args.at, args.window
    try:
        for sc in doc["scenarios"]:
            for c in sc["contenders"]:
                if c.get("run"):
                    report(sc["scenario"]["name"], c["contender"], c["run"], at, args.last,
                           window)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        sys.exit(f"{args.report} is not a swarm_bench report this reads: {e!r}")


if __name__ == "__main__":
    main()
