//! The HTTP fan-out contender's server and client, and the probe the orchestrator uses to
//! talk to the tracker from inside a namespace.
//!
//! The server is threaded (a thread per connection) and sends the file with `io::copy`, which
//! is `sendfile(2)` from a file to a socket on Linux. The client hashes while it writes, so
//! its `complete` event comes with the bytes verified. A client restarted with `--resume`
//! (the churn scenario, B4) keeps what its file holds and asks for the rest with
//! `Range: bytes=N-`, which the server answers from that offset.

use std::fs::OpenOptions;
use std::io::{BufWriter, Read, Seek as _, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{emit, self_usage, split_url, wait_for_eof, wait_for_go};

/// Longest response head accepted.
const MAX_HEAD: usize = 16 << 10;

/// `http-serve` flags.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The file every GET is answered with.
    #[arg(long)]
    file: PathBuf,
}

/// `http-get` flags. Several `--url`s (each with its `--out` and `--sha256`, in the same order)
/// are fetched at once, a connection each (the many-package scenario, B5).
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// `http://host:port/path`.
    #[arg(long, required = true)]
    url: Vec<String>,
    /// Where to write the body.
    #[arg(long, required = true)]
    out: Vec<PathBuf>,
    /// Expected SHA-256 of the body (hex).
    #[arg(long, required = true)]
    sha256: Vec<String>,
    /// Keep what an `--out` already holds and ask for the rest (`Range: bytes=N-`), as
    /// `curl -C -` does; without it every `--out` is written from the start.
    #[arg(long)]
    resume: bool,
}

/// `http-probe` flags.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// `http://host:port/path`.
    #[arg(long)]
    url: String,
    /// Write the body here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep trying (connection refused, non-200) for this long, in milliseconds.
    #[arg(long, default_value_t = 0)]
    retry_ms: u64,
}

fn read_request_head(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > MAX_HEAD {
            bail!("no request");
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The `N` of a request's `Range: bytes=N-`, the one form the client sends; any other range
/// is ignored (RFC 9110 lets a server answer a range request with the whole body).
fn range_start(request_head: &str) -> Option<u64> {
    request_head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        if !k.trim().eq_ignore_ascii_case("range") {
            return None;
        }
        v.trim()
            .strip_prefix("bytes=")?
            .strip_suffix('-')?
            .parse()
            .ok()
    })
}

fn serve_one(mut stream: TcpStream, file: &Path) -> anyhow::Result<u64> {
    let request = read_request_head(&mut stream)?;
    let mut f = std::fs::File::open(file)?;
    let len = f.metadata()?.len();
    let common = "Content-Type: application/octet-stream\r\nConnection: close";
    match range_start(&request) {
        Some(from) if from >= len => {
            write!(
                stream,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n{common}\r\n\r\n"
            )?;
            return Ok(0);
        }
        Some(from) => {
            f.seek(SeekFrom::Start(from))?;
            write!(
                stream,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\nContent-Length: {}\r\n{common}\r\n\r\n",
                len - 1,
                len - from
            )?;
        }
        None => write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n{common}\r\n\r\n"
        )?,
    }
    // From the file's offset: sendfile(2) on Linux.
    let sent = std::io::copy(&mut f, &mut stream)?;
    stream.flush()?;
    Ok(sent)
}

/// Run the server until stdin closes.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    let served = Arc::new(AtomicU64::new(0));
    let (s, file) = (served.clone(), args.file.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (s, file) = (s.clone(), file.clone());
            std::thread::spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                match serve_one(stream, &file) {
                    Ok(n) => {
                        s.fetch_add(n, Ordering::Relaxed);
                        emit(json!({"event": "served", "peer": peer, "bytes": n}));
                    }
                    Err(e) => emit(json!({"event": "error", "peer": peer, "error": e.to_string()})),
                }
            });
        }
    });
    emit(json!({"event": "ready"}));
    wait_for_eof();
    emit(
        json!({"event": "exit", "served_bytes": served.load(Ordering::Relaxed), "usage": self_usage()}),
    );
    Ok(())
}

/// What a response head says.
struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    /// `Content-Range: bytes FIRST-LAST/LENGTH` (or `bytes */LENGTH`): FIRST (`None` for `*`)
    /// and LENGTH.
    content_range: Option<(Option<u64>, u64)>,
}

/// The first byte and whole length of a `Content-Range` value.
fn parse_content_range(v: &str) -> Option<(Option<u64>, u64)> {
    let (span, len) = v.strip_prefix("bytes ")?.split_once('/')?;
    let first = match span {
        "*" => None,
        _ => Some(span.split_once('-')?.0.parse().ok()?),
    };
    Some((first, len.parse().ok()?))
}

fn parse_head(head: &str) -> anyhow::Result<Head> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut h = Head {
        status,
        content_length: None,
        chunked: false,
        content_range: None,
    };
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            h.content_length = v.parse().ok();
        } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            h.chunked = true;
        } else if k == "content-range" {
            h.content_range = parse_content_range(v);
        }
    }
    Ok(h)
}

/// Send a GET (from byte `from` on, if given) and read the head; returns the head and
/// whatever body bytes came with it.
fn request(
    url: &str,
    timeout: Option<Duration>,
    from: Option<u64>,
) -> anyhow::Result<(TcpStream, Head, Vec<u8>)> {
    let (host, path) = split_url(url)?;
    let mut stream = TcpStream::connect(host).with_context(|| format!("connect {host}"))?;
    stream.set_read_timeout(timeout)?;
    stream.set_nodelay(true)?;
    let range = from
        .map(|n| format!("Range: bytes={n}-\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{range}Connection: close\r\nUser-Agent: swarm_bench\r\n\r\n"
    )?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_head(&String::from_utf8_lossy(&buf[..end]))?;
            let rest = buf[end + 4..].to_vec();
            return Ok((stream, head, rest));
        }
        if buf.len() > MAX_HEAD {
            bail!("response head too long");
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Decode a whole chunked body.
fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(body.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Fetch a small resource (tracker API): retried until 200 or `--retry-ms` passes.
pub fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(args.retry_ms);
    loop {
        let attempt = (|| -> anyhow::Result<Vec<u8>> {
            let (mut stream, head, mut body) =
                request(&args.url, Some(Duration::from_secs(10)), None)?;
            stream.read_to_end(&mut body)?;
            if head.chunked {
                body = dechunk(&body)?;
            } else if let Some(n) = head.content_length {
                body.truncate(usize::try_from(n).unwrap_or(usize::MAX));
            }
            anyhow::ensure!(head.status == 200, "status {}", head.status);
            Ok(body)
        })();
        match attempt {
            Ok(body) => {
                match &args.out {
                    Some(p) => std::fs::write(p, &body)?,
                    None => std::io::stdout().write_all(&body)?,
                }
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Download once `go` arrives: every URL at once, a `done` line for each as it is whole and
/// checked, then `complete` with the body bytes received (with `--resume`, what was missing).
/// Exits 0 only with the expected bytes of every one.
pub fn get(args: GetArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.url.len() == args.out.len() && args.url.len() == args.sha256.len(),
        "give each --url its --out and --sha256"
    );
    emit(json!({"event": "ready"}));
    wait_for_go()?;
    let start = Instant::now();
    let resume = args.resume;
    let fetches: Vec<_> = (0..args.url.len())
        .map(|k| {
            let (url, out, sha) = (
                args.url[k].clone(),
                args.out[k].clone(),
                args.sha256[k].clone(),
            );
            std::thread::spawn(move || {
                let r = fetch(&url, &out, &sha, resume);
                if let Ok((_, ok)) = &r {
                    emit(json!({
                        "event": "done",
                        "index": k,
                        "secs": start.elapsed().as_secs_f64(),
                        "sha256_ok": ok,
                    }));
                }
                r
            })
        })
        .collect();
    let (mut bytes, mut all_ok) = (0u64, true);
    for f in fetches {
        let (got, ok) = f
            .join()
            .map_err(|_| anyhow::anyhow!("a fetch panicked"))??;
        bytes += got;
        all_ok &= ok;
    }
    emit(json!({
        "event": "complete",
        "secs": start.elapsed().as_secs_f64(),
        "bytes": bytes,
        "sha256_ok": all_ok,
        "usage": self_usage(),
    }));
    anyhow::ensure!(all_ok, "SHA-256 mismatch");
    Ok(())
}

/// One GET of `url` into `out`: the body bytes received, and whether the whole file's SHA-256
/// is `sha256`. With `resume`, the bytes `out` holds are kept (and hashed first) and only the
/// rest is asked for; a server that answers with the whole body has it written from the start.
fn fetch(url: &str, out: &Path, sha256: &str, resume: bool) -> anyhow::Result<(u64, bool)> {
    let held = match std::fs::metadata(out) {
        Ok(m) if resume => m.len(),
        _ => 0,
    };
    let (mut stream, head, first) = request(
        url,
        Some(Duration::from_secs(60)),
        (held > 0).then_some(held),
    )?;
    let length = head.content_length;
    // The body's length, and whether it follows the `held` bytes (or replaces them).
    let (expected, follows) = match (head.status, head.content_range) {
        (200, _) => (length.context("no Content-Length")?, false),
        (206, Some((Some(first), len))) if first == held => {
            let n = length.context("no Content-Length")?;
            ensure!(
                held + n == len,
                "range of {n} bytes from {held} is not the rest of {len}"
            );
            (n, true)
        }
        // Asked from the end: the file was whole already.
        (416, Some((None, len))) if len == held => (0, true),
        (s, range) => bail!("status {s} (Content-Range {range:?}) for a request from byte {held}"),
    };
    let mut hasher = Sha256::new();
    let file = if follows {
        let mut f = OpenOptions::new().read(true).append(true).open(out)?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        f
    } else {
        std::fs::File::create(out)?
    };
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut got = first.len() as u64;
    hasher.update(&first);
    out.write_all(&first)?;
    let mut buf = vec![0u8; 256 << 10];
    while got < expected {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed after {got} of {expected} bytes");
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        got += n as u64;
    }
    out.flush()?;
    Ok((
        got,
        hex::encode(hasher.finalize()) == sha256.to_ascii_lowercase(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_chunks() {
        let h = parse_head("HTTP/1.1 200 OK\r\nContent-Length: 42\r\nX: y").unwrap();
        assert_eq!(
            (h.status, h.content_length, h.chunked),
            (200, Some(42), false)
        );
        let h = parse_head("HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked").unwrap();
        assert_eq!((h.status, h.chunked), (404, true));
        assert!(parse_head("garbage").is_err());
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"5\r\nab").is_err());
    }

    #[test]
    fn ranges() {
        let req = |range: &str| format!("GET /f HTTP/1.1\r\nHost: h\r\n{range}\r\n\r\n");
        assert_eq!(range_start(&req("Range: bytes=1024-")), Some(1024));
        assert_eq!(range_start(&req("range:bytes=0-")), Some(0));
        // Forms the client never sends are served whole.
        assert_eq!(range_start(&req("Range: bytes=0-99")), None);
        assert_eq!(range_start(&req("Range: bytes=-100")), None);
        assert_eq!(range_start(&req("X: y")), None);
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((Some(5), 10)));
        assert_eq!(parse_content_range("bytes */10"), Some((None, 10)));
        assert_eq!(parse_content_range("bytes 5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    /// Serve `file` on loopback for `n` requests; the URL.
    fn serve_n(file: PathBuf, n: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/pkg", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(n) {
                let _ = serve_one(stream.unwrap(), &file);
            }
        });
        url
    }

    #[test]
    fn a_resumed_fetch_asks_only_for_what_the_file_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sha = hex::encode(Sha256::digest(&body));
        let src = dir.path().join("src");
        std::fs::write(&src, &body).unwrap();
        let url = serve_n(src, 5);
        let out = dir.path().join("out");

        // Nothing held: the whole body.
        assert_eq!(fetch(&url, &out, &sha, true).unwrap(), (300_000, true));
        // A prefix held (a client killed part way): only the rest comes.
        std::fs::write(&out, &body[..123_457]).unwrap();
        assert_eq!(fetch(&url, &out, &sha, true).unwrap(), (176_543, true));
        assert_eq!(std::fs::read(&out).unwrap(), body);
        // The whole file held: the server says there is nothing after it.
        assert_eq!(fetch(&url, &out, &sha, true).unwrap(), (0, true));
        // A held prefix that is wrong is not passed off as the package.
        let mut bad = body[..1000].to_vec();
        bad[10] ^= 1;
        std::fs::write(&out, &bad).unwrap();
        assert_eq!(fetch(&url, &out, &sha, true).unwrap(), (299_000, false));
        // Without --resume, what the file held is written over.
        assert_eq!(fetch(&url, &out, &sha, false).unwrap(), (300_000, true));
        assert_eq!(std::fs::read(&out).unwrap(), body);
    }
}
