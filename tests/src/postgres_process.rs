//! A throwaway PostgreSQL server for the replica scenarios: a fresh cluster (`initdb`) in a
//! temporary directory, on a free loopback port, trusting local connections, without fsync;
//! killed (the whole process group) on drop.
//!
//! PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user that
//! Debian's package creates, and the server runs as that user (`setpriv`).

use std::io;
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_loopback_port;

/// Longest a server may take to accept connections after spawn.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The role the tests connect as.
const USER: &str = "fbpkg";
/// With TLS, a role that must show a client certificate (see [`PostgresServer::mtls_url`]).
const MTLS_USER: &str = "fbpkg_mtls";

/// A running `postgres -D <tmp>/data -p PORT -h 127.0.0.1`.
#[derive(Debug)]
pub struct PostgresServer {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// Serving TLS too (`ssl=on`), with a certificate for 127.0.0.1 from a CA of its own.
    tls: bool,
}

/// Debian's server binaries (`/usr/lib/postgresql/<major>/bin`, the newest), or `None` (the
/// caller skips, saying so).
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// `bin/<tool>`, run as `postgres` when we are root.
fn tool(bin: &Path, name: &str) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(bin.join(name));
        c
    } else {
        Command::new(bin.join(name))
    }
}

impl PostgresServer {
    /// Create a cluster and start it, or `Ok(None)` when PostgreSQL is not installed
    /// (`apt-get install postgresql`; scripts/test.sh does it as root).
    pub fn start() -> io::Result<Option<Self>> {
        Self::start_with(false)
    }

    /// Like [`Self::start`], also accepting TLS (`ssl=on`) with a certificate for 127.0.0.1
    /// signed by a throwaway CA ([`Self::ca_file`]); `Ok(None)` when PostgreSQL or openssl is
    /// missing.
    pub fn start_tls() -> io::Result<Option<Self>> {
        if !crate::tls_certs::openssl_available() {
            return Ok(None);
        }
        Self::start_with(true)
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

    /// `postgres://fbpkg_mtls@127.0.0.1:PORT/postgres` (after [`Self::start_tls`]): a role the
    /// server lets in only over TLS and with a client certificate the CA signed
    /// ([`Self::client_cert_file`]).
    pub fn mtls_url(&self) -> String {
        format!("postgres://{MTLS_USER}@127.0.0.1:{}/postgres", self.port)
    }

    fn start_with(tls: bool) -> io::Result<Option<Self>> {
        let Some(bin) = postgres_bin_dir() else {
            eprintln!(
                "SKIPPED: PostgreSQL is not installed (apt-get install postgresql; \
                 scripts/test.sh installs it when run as root)"
            );
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        if is_root() {
            let chowned = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()?;
            if !chowned.success() {
                return Err(io::Error::other("chown of the cluster directory failed"));
            }
        }
        let out = tool(&bin, "initdb")
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        if tls {
            crate::tls_certs::make(dir.path())?;
            let key = dir.path().join("server.key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
            // The server refuses a key anyone else may read, and must own it.
            if is_root() {
                let chowned = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&key)
                    .arg(dir.path().join("server.pem"))
                    .status()?;
                if !chowned.success() {
                    return Err(io::Error::other("chown of the server's key failed"));
                }
            }
        }
        if tls {
            // Ahead of initdb's lines (the first that matches wins): the mTLS role over TLS
            // with a client certificate the CA signed, and not otherwise.
            let hba = dir.path().join("data").join("pg_hba.conf");
            let rest = std::fs::read_to_string(&hba)?;
            std::fs::write(
                &hba,
                format!(
                    "hostssl all {MTLS_USER} 127.0.0.1/32 trust clientcert=verify-ca\n\
                     host all {MTLS_USER} 127.0.0.1/32 reject\n{rest}"
                ),
            )?;
        }
        let mut s = Self {
            child: None,
            port: free_loopback_port()?,
            bin,
            dir,
            tls,
        };
        s.restart()?;
        if tls {
            s.psql(&format!("CREATE ROLE {MTLS_USER} LOGIN SUPERUSER"))?;
        }
        Ok(Some(s))
    }

    /// `postgres://fbpkg@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// SIGKILL the server and every backend (its process group), as a crash would, and reap it.
    pub fn kill(&mut self) -> io::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            c.wait()?;
        }
        Ok(())
    }

    /// Start it again on the same port and data (after [`Self::kill`], with crash recovery)
    /// and wait until it accepts connections.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill()?;
        self.child = Some(self.spawn()?);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Backends of a killed server may still be going away, holding its shared memory:
            // the new postmaster then exits at once, and is started again a moment later.
            if let Some(c) = self.child.as_mut()
                && c.try_wait()?.is_some()
            {
                std::thread::sleep(Duration::from_millis(100));
                self.child = Some(self.spawn()?);
            }
            let ready = tool(&self.bin, "pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
                .args(["-d", "postgres"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if ready.success() && TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "PostgreSQL on port {} not accepting connections after {START_TIMEOUT:?}; \
                     its log:\n{}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(&self) -> io::Result<Child> {
        tool(&self.bin, "postgres")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(self.dir.path())
            // No fsync (the machine does not crash under a test), but commits are written to
            // the WAL before they are acknowledged, so a kill -9 loses nothing committed:
            // `synchronous_commit=off` would, and a restart test would see tables vanish.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            // Dynamic shared memory in the data directory, not /dev/shm: a server killed with
            // SIGKILL (every test's end, see `Drop`) cannot unlink its segments, and each run
            // left 4-8 MiB of them in /dev/shm for good (107 files after a day of runs).
            .args(["-c", "dynamic_shared_memory_type=mmap"])
            .args(if self.tls {
                vec![
                    "-c".to_owned(),
                    "ssl=on".to_owned(),
                    "-c".to_owned(),
                    format!(
                        "ssl_cert_file={}",
                        self.dir.path().join("server.pem").display()
                    ),
                    "-c".to_owned(),
                    format!(
                        "ssl_key_file={}",
                        self.dir.path().join("server.key").display()
                    ),
                    // Client certificates are checked against it (pg_hba asks for one).
                    "-c".to_owned(),
                    format!("ssl_ca_file={}", self.dir.path().join("ca.pem").display()),
                ]
            } else {
                Vec::new()
            })
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file()?)
            .spawn()
    }

    fn log_file(&self) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
    }

    /// What the server logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Run `sql` with psql as the test role (for a test to look at the tables).
    pub fn psql(&self, sql: &str) -> io::Result<String> {
        let out = tool(&self.bin, "psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args(["-d", "postgres", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(io::Error::other(format!(
                "psql: {}",
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
