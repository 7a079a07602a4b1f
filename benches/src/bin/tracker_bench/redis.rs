//! A throwaway `redis-server` for the replica measurement (loopback, a free port, its own
//! scratch directory, no persistence; killed when dropped), and the few commands the bench
//! sends it itself: `PING` until it answers, `FLUSHALL` between configurations, and
//! `INFO commandstats` around a window to count what the trackers asked of it.
//!
//! The bench speaks RESP itself (arrays of bulk strings out; simple, error, integer and bulk
//! replies in) rather than depend on a Redis client for four commands.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::contenders::{self, Child};

/// How long redis-server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest one command of the bench's may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra `redis-server` arguments, whitespace-separated.
pub const EXTRA_ARGS_ENV: &str = "FBPKG_BENCH_REDIS_ARGS";
/// Largest reply read (an `INFO` is a few KiB).
const MAX_REPLY: usize = 1 << 20;

/// Commands a client sends on its own, as opposed to those `announce.lua` runs inside Redis:
/// one of these is one round trip. `INFO` is left out: only the bench sends it. A transaction
/// (a replica's plain writes: `MULTI`, the commands, `EXEC`, written at once) is one round
/// trip, counted by its `EXEC`; the commands in it count as commands Redis ran.
const TOP_LEVEL: &[&str] = &[
    "exec",
    "evalsha",
    "eval",
    "evalsha_ro",
    "eval_ro",
    "script|load",
    "script",
    "ping",
    "hello",
    "client|setinfo",
    "client",
    "select",
];

/// A running redis-server.
#[derive(Debug)]
pub struct RedisServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// How it was started, for the report.
    pub setup: RedisSetup,
    /// The process (dropped before `_dir`).
    pub process: Child,
    _dir: tempfile::TempDir,
}

/// How Redis was run.
#[derive(Debug, Clone, Serialize)]
pub struct RedisSetup {
    /// The program.
    pub binary: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// `redis-server --version`.
    pub version: Option<String>,
}

/// Where Debian's package puts the server.
fn binary() -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .context("redis-server is not installed: `apt-get install -y redis-server`")
}

impl RedisServer {
    /// Start one on a free loopback port and wait until it answers `PING`.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = binary()?;
        let dir = contenders::scratch_dir("fbpkg-bench-redis-")?;
        let addr = contenders::free_port()?;
        let mut args: Vec<String> = [
            "--port",
            &addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &dir.path().display().to_string(),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        // Server settings to compare (e.g. `--hash-max-listpack-value 128`), recorded in the
        // report with the rest of the arguments.
        if let Ok(extra) = std::env::var(EXTRA_ARGS_ENV) {
            args.extend(extra.split_whitespace().map(str::to_owned));
        }
        let mut cmd = Command::new(&bin);
        cmd.args(&args).env_clear();
        let mut process = Child::spawn("redis-server", cmd, dir.path().join("redis.log"))?;
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            process.check_alive()?;
            match command(addr, &["PING"]).await {
                Ok(Reply::Simple(s)) if s == "PONG" => break,
                other => ensure!(
                    Instant::now() < deadline,
                    "redis-server on {addr} not answering PING after {READY_TIMEOUT:?}: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            addr,
            setup: RedisSetup {
                binary: bin.display().to_string(),
                args,
                version,
            },
            process,
            _dir: dir,
        })
    }

    /// `redis://127.0.0.1:PORT/0`, for `--peer-store`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Empty every database, so a configuration starts with no peers left by the last one.
    pub async fn flushall(&mut self) -> anyhow::Result<()> {
        self.process.check_alive()?;
        match command(self.addr, &["FLUSHALL"]).await? {
            Reply::Simple(s) if s == "OK" => Ok(()),
            other => bail!("FLUSHALL answered {other:?}"),
        }
    }

    /// Calls so far of each command (`INFO commandstats`).
    pub async fn command_calls(&self) -> anyhow::Result<CommandCalls> {
        match command(self.addr, &["INFO", "commandstats"]).await? {
            Reply::Bulk(text) => Ok(CommandCalls::parse(&text)),
            other => bail!("INFO commandstats answered {other:?}"),
        }
    }
}

/// Calls and microseconds per command name, from `INFO commandstats`.
#[derive(Debug, Clone, Default)]
pub struct CommandCalls(BTreeMap<String, (u64, u64)>);

impl CommandCalls {
    /// `cmdstat_NAME:calls=N,usec=U,...` lines.
    fn parse(info: &str) -> Self {
        Self(
            info.lines()
                .filter_map(|line| {
                    let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
                    let field = |key: &str| -> Option<u64> {
                        fields
                            .split(',')
                            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))?
                            .parse()
                            .ok()
                    };
                    Some((name.to_owned(), (field("calls")?, field("usec")?)))
                })
                .collect(),
        )
    }

    fn since(&self, before: &Self) -> impl Iterator<Item = (&str, u64)> {
        self.usec_since(before)
            .map(|(name, calls, _)| (name, calls))
    }

    /// Calls and microseconds of each command since `before`.
    fn usec_since(&self, before: &Self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.0.iter().map(|(name, (calls, usec))| {
            let (c0, u0) = before.0.get(name).copied().unwrap_or((0, 0));
            (
                name.as_str(),
                calls.saturating_sub(c0),
                usec.saturating_sub(u0),
            )
        })
    }

    /// Microseconds Redis spent in each command since `before`, busiest first. A script's
    /// time includes the commands it ran, which are listed too.
    pub fn busiest_since(&self, before: &Self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = self
            .usec_since(before)
            .filter(|(name, calls, _)| *calls > 0 && *name != "info")
            .map(|(name, calls, usec)| (name.to_owned(), calls, usec))
            .collect();
        v.sort_by_key(|(_, _, usec)| std::cmp::Reverse(*usec));
        v
    }

    /// Commands clients sent since `before` (each one round trip), the bench's own `INFO`
    /// left out.
    pub fn round_trips_since(&self, before: &Self) -> u64 {
        self.since(before)
            .filter(|(name, _)| TOP_LEVEL.contains(name))
            .map(|(_, n)| n)
            .sum()
    }

    /// Every command Redis ran since `before`, those run inside scripts included (the
    /// bench's own `INFO` left out).
    pub fn commands_since(&self, before: &Self) -> u64 {
        self.since(before)
            .filter(|(name, _)| *name != "info")
            .map(|(_, n)| n)
            .sum()
    }
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+...`
    Simple(String),
    /// `-...`
    Error(String),
    /// `:N`
    Integer(i64),
    /// `$N` with its bytes (lossily decoded), or `$-1` as `None`.
    Bulk(String),
    /// `$-1`.
    Nil,
}

/// One command on a fresh connection.
async fn command(addr: SocketAddr, args: &[&str]) -> anyhow::Result<Reply> {
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(&req).await?;
        let mut buf = Vec::with_capacity(4096);
        loop {
            if let Some(reply) = parse_reply(&buf)? {
                return Ok(reply);
            }
            ensure!(buf.len() < MAX_REPLY, "Redis reply over {MAX_REPLY} bytes");
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("Redis closed the connection before replying");
            }
        }
    };
    tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .with_context(|| format!("Redis {} timed out", args.first().unwrap_or(&"")))?
}

/// A whole reply at the start of `buf`, or `None` when more bytes are needed.
fn parse_reply(buf: &[u8]) -> anyhow::Result<Option<Reply>> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&buf[1..eol]).into_owned();
    Ok(Some(match buf[0] {
        b'+' => Reply::Simple(line),
        b'-' => Reply::Error(line),
        b':' => Reply::Integer(line.parse().context("bad RESP integer")?),
        b'$' => {
            let len: i64 = line.parse().context("bad RESP bulk length")?;
            let Ok(len) = usize::try_from(len) else {
                return Ok(Some(Reply::Nil));
            };
            let body = eol + 2;
            if buf.len() < body + len + 2 {
                return Ok(None);
            }
            Reply::Bulk(String::from_utf8_lossy(&buf[body..body + len]).into_owned())
        }
        other => bail!("unexpected RESP reply type {:?}", other as char),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_framed_and_need_their_whole_body() {
        assert_eq!(
            parse_reply(b"+PONG\r\n").ok().flatten(),
            Some(Reply::Simple("PONG".into()))
        );
        assert_eq!(parse_reply(b"+PON").ok().flatten(), None);
        assert_eq!(parse_reply(b"$5\r\nab").ok().flatten(), None);
        assert_eq!(
            parse_reply(b"$5\r\nab\r\nc\r\n").ok().flatten(),
            Some(Reply::Bulk("ab\r\nc".into()))
        );
        assert_eq!(parse_reply(b"$-1\r\n").ok().flatten(), Some(Reply::Nil));
        assert!(parse_reply(b"?x\r\n").is_err());
    }

    #[test]
    fn round_trips_count_what_clients_sent_not_what_scripts_ran() {
        let before = CommandCalls::parse(
            "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=100\r\ncmdstat_zadd:calls=10,usec=1\r\n",
        );
        let after = CommandCalls::parse(
            "# Commandstats\r\ncmdstat_evalsha:calls=30,usec=900\r\ncmdstat_zadd:calls=40,usec=31\r\n\
             cmdstat_ping:calls=2,usec=1\r\ncmdstat_info:calls=5,usec=1\r\n",
        );
        assert_eq!(after.round_trips_since(&before), 22);
        assert_eq!(after.commands_since(&before), 52);
        // A transaction is one round trip: its EXEC.
        let multi = CommandCalls::parse(
            "# Commandstats\r\ncmdstat_multi:calls=3,usec=1\r\ncmdstat_exec:calls=3,usec=60\r\n\
             cmdstat_zadd:calls=12,usec=12\r\n",
        );
        assert_eq!(multi.round_trips_since(&before), 3);
        assert_eq!(
            after.busiest_since(&before),
            vec![
                ("evalsha".to_owned(), 20, 800),
                ("zadd".to_owned(), 30, 30),
                ("ping".to_owned(), 2, 1)
            ]
        );
    }
}
