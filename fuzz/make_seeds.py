#!/usr/bin/env python3
"""Write the committed seed corpus: fuzz/corpus/<target>/seed-<name>, a few valid inputs each.

libFuzzer grows the corpus from these; only the seed-* files are committed (see .gitignore).
Run from anywhere: python3 fuzz/make_seeds.py. Deterministic, so re-running changes nothing.
"""

import hashlib
import os
import struct
from urllib.parse import quote_from_bytes

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def ben(v):
    """Bencode with keys in the order given (dicts as lists of pairs keep it)."""
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, str):
        v = v.encode()
    if isinstance(v, bytes):
        return b"%d:%s" % (len(v), v)
    if isinstance(v, list):
        return b"l" + b"".join(ben(x) for x in v) + b"e"
    if isinstance(v, tuple):  # ("dict", [(k, v), ...])
        return b"d" + b"".join(ben(k) + ben(x) for k, x in v[1]) + b"e"
    raise TypeError(v)


def d(*pairs):
    return ("dict", list(pairs))


def pieces(n):
    return b"".join(hashlib.sha1(b"%d" % i).digest() for i in range(n))


def metainfo(length, piece_length, name="pkg.bin", fmt=None, announce="http://t:6969/announce"):
    info = [
        ("length", length),
        ("name", name),
        ("piece length", piece_length),
        ("pieces", pieces(-(-length // piece_length))),
        ("private", 1),
        ("sha256", hashlib.sha256(name.encode()).hexdigest()),
    ]
    if fmt:
        info.append(("x-fbpkg-format", fmt))
    return ben(d(("announce", announce), ("info", d(*info))))


# --- bencode -------------------------------------------------------------------------------
for name, v in {
    "int": b"i-12e",
    "string": b"4:spam",
    "list": b"l4:spami42ee",
    "dict": b"d3:cow3:moo4:spaml1:a1:bee",
    "nested": b"d1:ad1:bl1:cd1:di1eeeee",
    "unsorted": b"d1:zi1e1:ai2ee",
    "metainfo": metainfo(40000, 16384),
}.items():
    write("bencode", name, v)

# --- metainfo ------------------------------------------------------------------------------
write("metainfo", "file", metainfo(100000, 32768))
write("metainfo", "one-piece", metainfo(5, 16384, name="x"))
write("metainfo", "tar-zst", metainfo(70000, 65536, name="dir.tar.zst", fmt="tar.zst"))
write("metainfo", "executable", metainfo(20000, 16384, name="tool", fmt="executable"))


def tree_metainfo():
    """A tree package: a small file, padding, a large executable, a link, an empty directory.
    Its sha256 is its manifest's, so it parses; the fuzzer then edits what the manifest does
    not cover (padding, pieces, piece length) and finds the layouts storage must survive."""
    def regular(path, length, mode, content):
        entry = [("length", length), ("mode", mode), ("path", path),
                 ("sha256", hashlib.sha256(content).hexdigest())]
        return d(*([("attr", "x")] if mode & 0o111 else []) + entry)
    small = regular(["a"], 5, 0o644, b"small")
    big = regular(["bin", "big"], 40000, 0o755, b"big")
    link = d(("attr", "l"), ("length", 0), ("path", ["tool"]), ("symlink path", ["bin", "big"]))
    pad = d(("attr", "p"), ("length", 16379), ("path", [".pad", "0"]))
    dirs = [d(("mode", 0o755), ("path", ["bin"])), d(("mode", 0o750), ("path", ["empty"]))]
    manifest = ben(d(("dirs", dirs), ("files", [small, big, link])))
    length = 5 + 16379 + 40000
    info = d(
        ("files", [small, pad, big, link]),
        ("name", "app"),
        ("piece length", 16384),
        ("pieces", pieces(-(-length // 16384))),
        ("private", 1),
        ("sha256", hashlib.sha256(manifest).hexdigest()),
        ("x-fbpkg-dirs", dirs),
        ("x-fbpkg-format", "tree"),
    )
    return ben(d(("announce", "http://t:6969/announce"), ("info", info)))


write("metainfo", "tree", tree_metainfo())
write(
    "metainfo",
    "unsorted-no-announce",
    ben(d(("info", d(
        ("sha256", "a" * 64),
        ("name", "x"),
        ("length", 5),
        ("piece length", 16384),
        ("pieces", "p" * 20),
    )))),
)

# --- announce_query / scrape_query ---------------------------------------------------------
ih = bytes(range(1, 21))
pid = b"-FB0001-abcdefghijkl"
q = lambda b: quote_from_bytes(b, safe="-._~")
write("announce_query", "minimal", f"info_hash={q(ih)}&peer_id={q(pid)}&port=6881&left=0")
write(
    "announce_query",
    "full",
    f"info_hash={q(ih)}&peer_id={q(pid)}&port=6881&uploaded=10&downloaded=20&left=30"
    f"&compact=1&event=started&numwant=50&no_peer_id=1&key=k%20y&ip=10.0.0.1&zone=dc1/rack7",
)
write(
    "announce_query",
    "ipv6-stopped",
    f"peer_id={q(pid)}&info_hash={q(bytes(20))}&port=1&left=99&event=stopped&compact=0"
    f"&ip=%3A%3A1&trackerid=x",
)
write("scrape_query", "empty", "")
write("scrape_query", "one", f"info_hash={q(ih)}")
write("scrape_query", "three", "&".join(f"info_hash={q(bytes([i]) * 20)}" for i in range(3)))

# --- announce_response ---------------------------------------------------------------------
v4 = bytes([10, 0, 0, 1]) + struct.pack(">H", 6881) + bytes([192, 168, 1, 2]) + struct.pack(">H", 1)
v6 = bytes(15) + b"\x01" + struct.pack(">H", 6881)
write(
    "announce_response",
    "compact",
    ben(d(("complete", 1), ("incomplete", 2), ("interval", 60), ("min interval", 30), ("peers", v4))),
)
write(
    "announce_response",
    "compact-v6-warning",
    ben(d(("complete", 0), ("incomplete", 0), ("interval", 1800), ("peers", v4), ("peers6", v6),
          ("warning message", "slow down"))),
)
write(
    "announce_response",
    "dict",
    ben(d(("complete", 3), ("incomplete", 0), ("interval", 60), ("peers", [
        d(("ip", "10.1.2.3"), ("peer id", pid), ("port", 6881)),
        d(("ip", "::1"), ("port", 7000)),
    ]))),
)
write("announce_response", "failure", ben(d(("failure reason", "unknown package"))))
write(
    "announce_response",
    "scrape",
    ben(d(("files", d((ih, d(("complete", 1), ("downloaded", 5), ("incomplete", 2))))))),
)

# --- wire: [limit selector][chunk seed][stream] --------------------------------------------
def msg(mid, payload=b""):
    return struct.pack(">I", len(payload) + 1) + bytes([mid]) + payload


block = struct.pack(">III", 3, 16384, 16384)
stream = b"".join([
    struct.pack(">I", 0),  # keep-alive
    msg(0), msg(1), msg(2), msg(3),
    msg(4, struct.pack(">I", 7)),
    msg(5, b"\xff\xf0"),
    msg(6, block),
    msg(7, struct.pack(">II", 3, 0) + b"data"),
    msg(8, block),
    msg(9, struct.pack(">H", 6881)),
    msg(0x0D, struct.pack(">I", 1)), msg(0x0E), msg(0x0F),
    msg(0x10, block),
    msg(0x11, struct.pack(">I", 2)),
    msg(20, b"\x00d1:md11:ut_metadatai1eee"),
    msg(99, b"ignored"),
])
write("wire", "every-message", b"\x00\x07" + stream)
write("wire", "every-message-small-limit", b"\x22\x2b" + stream)
handshake = b"\x13BitTorrent protocol" + bytes([0, 0, 0, 0, 0, 0x10, 0, 0x04]) + ih + pid
write("wire", "handshake", b"\x00\x01" + handshake)
write("wire", "partial-piece", b"\x00\x03" + msg(7, struct.pack(">II", 0, 0) + b"x" * 40)[:30])

# --- tracker_head --------------------------------------------------------------------------
for name, head in {
    "announce-11": f"GET /announce?info_hash={q(ih)}&peer_id={q(pid)}&port=6881&left=0 HTTP/1.1\r\n"
    "Host: tracker:6969\r\nUser-Agent: fbpkg-rs/0.1\r\n\r\n",
    "announce-10-close": "GET /announce?port=1 HTTP/1.0\r\nConnection: close\r\n\r\n",
    "scrape-keepalive": f"GET /scrape?info_hash={q(ih)} HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    "pipelined": "GET /scrape HTTP/1.1\r\n\r\nGET /announce?x=1 HTTP/1.1\r\n\r\n",
    "lf-only": "GET /announce?a=b HTTP/1.1\nHost: x\n\n",
    "other": "POST /api/v1/packages HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
}.items():
    write("tracker_head", name, head)

# --- control_request -----------------------------------------------------------------------
for name, line in {
    "ping": '{"op":"ping"}\n',
    "status": '{"op":"status"}\r\n',
    "fetch": '{"op":"fetch","name":"tool","sha256":"' + "ab" * 32 + '"}\n',
    "add": '{"op":"add","name":"p","metainfo_hex":"64656565","path":"/tmp/p.bin","take":true}\n',
    "announce": '{"op":"announce","info_hash":"' + "0f" * 20 + '"}',
    "escapes": '{"op":"fetch","name":"t\\u00e9st\\n","sha256":"\\"x\\""}\n',
}.items():
    write("control_request", name, line)
