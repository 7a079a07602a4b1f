//! The HTTP fan-out contender's server and client, and the probe the orchestrator uses to
//! talk to the tracker from inside a namespace.
//!
//! The server is threaded (a thread per connection) and sends the file with `io::copy`, which
//! is `sendfile(2)` from a file to a socket on Linux. The client hashes while it writes, so
//! its `complete` event comes with the bytes verified.

use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
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

fn read_request_head(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > MAX_HEAD {
            bail!("no request");
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

fn serve_one(mut stream: TcpStream, file: &std::path::Path) -> anyhow::Result<u64> {
    read_request_head(&mut stream)?;
    let mut f = std::fs::File::open(file)?;
    let len = f.metadata()?.len();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    )?;
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
        }
    }
    Ok(h)
}

/// Send a GET and read the head; returns the head and whatever body bytes came with it.
fn request(url: &str, timeout: Option<Duration>) -> anyhow::Result<(TcpStream, Head, Vec<u8>)> {
    let (host, path) = split_url(url)?;
    let mut stream = TcpStream::connect(host).with_context(|| format!("connect {host}"))?;
    stream.set_read_timeout(timeout)?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: swarm_bench\r\n\r\n"
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
            let (mut stream, head, mut body) = request(&args.url, Some(Duration::from_secs(10)))?;
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
/// checked, then `complete`. Exits 0 only with the expected bytes of every one.
pub fn get(args: GetArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.url.len() == args.out.len() && args.url.len() == args.sha256.len(),
        "give each --url its --out and --sha256"
    );
    emit(json!({"event": "ready"}));
    wait_for_go()?;
    let start = Instant::now();
    let fetches: Vec<_> = (0..args.url.len())
        .map(|k| {
            let (url, out, sha) = (
                args.url[k].clone(),
                args.out[k].clone(),
                args.sha256[k].clone(),
            );
            std::thread::spawn(move || {
                let r = fetch(&url, &out, &sha);
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

/// One GET of `url` into `out`: the bytes received, and whether their SHA-256 is `sha256`.
fn fetch(url: &str, out: &std::path::Path, sha256: &str) -> anyhow::Result<(u64, bool)> {
    let (mut stream, head, first) = request(url, Some(Duration::from_secs(60)))?;
    anyhow::ensure!(head.status == 200, "status {}", head.status);
    let expected = head.content_length.context("no Content-Length")?;
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    let mut hasher = Sha256::new();
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
}
