//! A throwaway `redis-server` for the Redis peer-store scenarios: on a free loopback port, no
//! persistence, in a temporary directory; killed on drop.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_loopback_port;

/// Longest a redis-server may take to answer `PING` after spawn.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `redis-server --port P --save '' --appendonly no`.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Also serving TLS on this port, with a certificate for 127.0.0.1 from a CA of its own.
    tls_port: Option<u16>,
    /// Over TLS, clients must show a certificate signed by that CA.
    client_auth: bool,
}

/// Where Debian's package puts the server, or `None` (the caller skips, saying so).
pub fn redis_server_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
}

impl RedisServer {
    /// Start one, or `Ok(None)` when redis-server is not installed (`apt-get install
    /// redis-server`; scripts/test.sh does it as root).
    pub fn start() -> io::Result<Option<Self>> {
        if redis_server_binary().is_none() {
            eprintln!(
                "SKIPPED: redis-server is not installed (apt-get install redis-server; \
                 scripts/test.sh installs it when run as root)"
            );
            return Ok(None);
        }
        let mut s = Self {
            child: None,
            port: free_loopback_port()?,
            dir: tempfile::tempdir()?,
            tls_port: None,
            client_auth: false,
        };
        s.restart()?;
        Ok(Some(s))
    }

    /// Like [`Self::start`], also serving TLS ([`Self::tls_url`]) with a certificate for
    /// 127.0.0.1 signed by a throwaway CA ([`Self::ca_file`]), made with the `openssl` tool;
    /// `Ok(None)` when either program is missing.
    pub fn start_tls() -> io::Result<Option<Self>> {
        Self::start_tls_with(false)
    }

    /// Like [`Self::start_tls`], and over TLS every client must show a certificate the CA
    /// signed ([`Self::client_cert_file`], `tls-auth-clients yes`).
    pub fn start_mtls() -> io::Result<Option<Self>> {
        Self::start_tls_with(true)
    }

    fn start_tls_with(client_auth: bool) -> io::Result<Option<Self>> {
        if !crate::tls_certs::openssl_available() {
            return Ok(None);
        }
        if redis_server_binary().is_none() {
            return Self::start();
        }
        let mut s = Self {
            child: None,
            port: free_loopback_port()?,
            dir: tempfile::tempdir()?,
            tls_port: Some(free_loopback_port()?),
            client_auth,
        };
        crate::tls_certs::make(s.dir.path())?;
        s.restart()?;
        Ok(Some(s))
    }

    /// `rediss://127.0.0.1:TLS_PORT/0` (after [`Self::start_tls`]).
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}/0"))
    }

    /// The PEM of the CA that signed the TLS certificate (after [`Self::start_tls`]).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A client certificate the CA signed, and its key (after [`Self::start_tls`]).
    pub fn client_cert_file(&self) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        (d.join("client.pem"), d.join("client.key"))
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL it (no goodbye to its clients) and reap it. Its data is gone: it kept none.
    pub fn kill(&mut self) -> io::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Start it again on the same port (after [`Self::kill`]) and wait until it answers.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill()?;
        let bin = redis_server_binary()
            .ok_or_else(|| io::Error::other("redis-server is not installed"))?;
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(self.tls_port.iter().flat_map(|p| {
                [
                    "--tls-port".to_owned(),
                    p.to_string(),
                    "--tls-cert-file".to_owned(),
                    "server.pem".to_owned(),
                    "--tls-key-file".to_owned(),
                    "server.key".to_owned(),
                    "--tls-ca-cert-file".to_owned(),
                    "ca.pem".to_owned(),
                    "--tls-auth-clients".to_owned(),
                    if self.client_auth { "yes" } else { "no" }.to_owned(),
                ]
            }))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.ping() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(io::Error::other(format!(
                        "redis-server on port {} not answering PING after {START_TIMEOUT:?}: {e}",
                        self.port
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// One inline command (`DEL key`, say); its first reply line, `\r\n` removed.
    pub fn command(&self, line: &str) -> io::Result<String> {
        self.send(line).map(|(_, head)| head)
    }

    /// Send one inline command on a new connection: the connection, to read the rest of the
    /// reply from, and the reply's first line, `\r\n` removed.
    fn send(&self, line: &str) -> io::Result<(TcpStream, String)> {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("{line}\r\n").as_bytes())?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n") {
            s.read_exact(&mut byte)?;
            buf.push(byte[0]);
        }
        buf.truncate(buf.len() - 2);
        let head = String::from_utf8(buf).map_err(io::Error::other)?;
        Ok((s, head))
    }

    /// One inline command answered with a bulk string (`HGET key field`, say): the string,
    /// `None` for nil.
    pub fn bulk(&self, line: &str) -> io::Result<Option<String>> {
        let (mut s, head) = self.send(line)?;
        let len = match head.strip_prefix('$').map(str::parse::<i64>) {
            Some(Ok(-1)) => return Ok(None),
            Some(Ok(n)) => usize::try_from(n).map_err(io::Error::other)?,
            _ => return Err(io::Error::other(format!("{line} answered {head:?}"))),
        };
        let mut body = vec![0u8; len + 2];
        s.read_exact(&mut body)?;
        body.truncate(len);
        String::from_utf8(body).map(Some).map_err(io::Error::other)
    }

    /// `DBSIZE`: how many keys it holds.
    pub fn dbsize(&self) -> io::Result<u64> {
        let line = self.command("DBSIZE")?;
        line.strip_prefix(':')
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| io::Error::other(format!("DBSIZE answered {line:?}")))
    }

    /// One `PING`, answered `+PONG`.
    pub fn ping(&self) -> io::Result<()> {
        match self.command("PING")?.as_str() {
            "+PONG" => Ok(()),
            other => Err(io::Error::other(format!("PING answered {other:?}"))),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
