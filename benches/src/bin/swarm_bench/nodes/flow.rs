//! One bulk TCP flow, iperf-like, to check that a single flow reaches a `tbf` cap.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use super::emit;

/// `flow-recv` flags.
#[derive(Debug, clap::Args)]
pub struct RecvArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Leave the first seconds out of the steady rate (slow start).
    #[arg(long, default_value_t = 1.0)]
    skip_secs: f64,
}

/// `flow-send` flags.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Receiver.
    #[arg(long)]
    to: SocketAddr,
    /// How long to send.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
}

/// Accept one connection, count its bytes until EOF, report the payload rate.
pub fn recv(args: RecvArgs) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    emit(json!({"event": "ready"}));
    let (mut stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    let mut start: Option<Instant> = None;
    let mut at_skip: Option<(Instant, u64)> = None;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let now = Instant::now();
        let t0 = *start.get_or_insert(now);
        total += n as u64;
        if at_skip.is_none() && now.duration_since(t0).as_secs_f64() >= args.skip_secs {
            at_skip = Some((now, total));
        }
    }
    let end = Instant::now();
    let (steady_secs, steady_bytes) = match at_skip {
        Some((t, b)) => (end.duration_since(t).as_secs_f64(), total - b),
        None => (0.0, 0),
    };
    emit(json!({
        "event": "done",
        "bytes": total,
        "secs": start.map(|s| end.duration_since(s).as_secs_f64()),
        "steady_secs": steady_secs,
        "steady_bytes": steady_bytes,
        "steady_payload_bps": if steady_secs > 0.0 { steady_bytes as f64 * 8.0 / steady_secs } else { 0.0 },
    }));
    Ok(())
}

/// Send zeros for `--secs`, then close.
pub fn send(args: SendArgs) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(args.to).with_context(|| format!("connect {}", args.to))?;
    let buf = vec![0u8; 256 << 10];
    let end = Instant::now() + Duration::from_secs_f64(args.secs);
    while Instant::now() < end {
        stream.write_all(&buf)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}
