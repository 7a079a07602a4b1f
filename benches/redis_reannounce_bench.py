#!/usr/bin/env python3
"""Redis's own CPU per announce in tracker/src/peer_store/announce.lua for a fleet's steady
state: 4,096 swarms of 5 peers each, every announce a known peer announcing again (no joins,
no expiry), the clock moving 1 ms per announce, so a swarm hears from one of its peers every
~4 s. Batches of 32 announces per EVALSHA, answered from a copy (`none`), as a replica sends
them. A scratch redis-server on loopback (no persistence) per run.

    benches/redis_reannounce_bench.py [REV ...]     # default: HEAD; each run twice, alternating

Prints redis-server CPU (INFO cpu) and the commands the script ran (INFO commandstats), per
announce. Needs python3 and redis-server (apt-get install redis-server). Revisions before
the v2 keys (7bdbafd) run too: the ARGV layout is the same.
"""
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

BATCH, SWARMS, PEERS, ANNOUNCES = 32, 4096, 5, 60_000


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Redis:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.f = self.sock.makefile("rb")

    def read(self):
        line = self.f.readline()
        kind = line[:1]
        if kind == b"-":
            raise RuntimeError(line.decode().strip())
        if kind in b"+:":
            return line
        if kind == b"$":
            n = int(line[1:])
            return self.f.read(n + 2)[:-2] if n >= 0 else None
        if kind == b"*":
            return [self.read() for _ in range(max(int(line[1:]), 0))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def cmd(self, *args):
        self.sock.sendall(resp(*args))
        return self.read()

    def info(self, section):
        body = self.cmd("INFO", section).decode()
        return dict(l.split(":", 1) for l in body.split("\r\n") if ":" in l)

    def cpu(self):
        i = self.info("cpu")
        return float(i["used_cpu_user"]) + float(i["used_cpu_sys"])


def call(sha, batch, now):
    args = ["EVALSHA", sha, 0, 120_000, 100_000, 100_000, 1000, 604_800_000, "bench:peers",
            "bench", len(batch)]
    for h, pid, ip in batch:
        rec = f"L||{ip}:6881|{pid}|0|0|5"
        args += [h, f"{pid}@{ip}", ip, "", "L", "", rec, now, 50, "none"]
    return resp(*args)


def run(port, rev, script):
    r = Redis(port)
    r.cmd("FLUSHALL")
    sha = r.cmd("SCRIPT", "LOAD", script).decode()
    rng = random.Random(1)
    hashes = ["%040x" % rng.getrandbits(160) for _ in range(SWARMS)]
    peers = [(h, "%040x" % rng.getrandbits(160), f"10.{i % 200}.{j}.{i // 200 % 200}")
             for i, h in enumerate(hashes) for j in range(PEERS)]
    now = 1_700_000_000_000
    for i in range(0, len(peers), BATCH):
        r.sock.sendall(call(sha, peers[i:i + BATCH], now))
        for reply in r.read():
            if reply[0] != b":0\r\n":
                sys.exit(f"{rev}: the script failed: {reply}")
    r.cmd("CONFIG", "RESETSTAT")
    c0, done = r.cpu(), 0
    while done < ANNOUNCES:
        calls = []
        for _ in range(16):
            now += BATCH
            calls.append(call(sha, [rng.choice(peers) for _ in range(BATCH)], now))
            done += BATCH
        r.sock.sendall(b"".join(calls))
        for _ in calls:
            r.read()
    cpu = r.cpu() - c0
    stats = r.info("commandstats")
    ran = sum(int(v.split("calls=")[1].split(",")[0]) for k, v in stats.items()
              if k.startswith("cmdstat_") and k not in ("cmdstat_evalsha", "cmdstat_info"))
    print(f"{rev}: {cpu / done * 1e6:.1f} us of redis-server CPU and "
          f"{ran / done:.2f} commands per announce ({done} announces)")


def main():
    revs = sys.argv[1:] or ["HEAD"]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    scripts = {rev: subprocess.run(
        ["git", "show", f"{rev}:tracker/src/peer_store/announce.lua"], cwd=root, check=True,
        capture_output=True).stdout for rev in revs}
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with tempfile.TemporaryDirectory() as d:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    Redis(port).cmd("PING")
                    break
                except OSError:
                    time.sleep(0.05)
            for _ in range(2):
                for rev in revs:
                    run(port, rev, scripts[rev])
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
