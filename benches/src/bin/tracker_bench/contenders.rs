//! Starting the two trackers on free loopback ports, registering the swarms with each, and
//! checking that each refuses a swarm it does not know (so both really run with a whitelist).
//!
//! Every process started here is held by a [`Child`] guard that kills it when dropped: on
//! success, on error and on Ctrl-C (the bench unwinds to `main`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use fbpkg_benches::workload::{Outcome, Workload, classify, write_announce};
use fbpkg_benches::{fbpkg_binary, http1};
use fbpkg_common::InfoHash;
use fbpkg_common::metainfo::{Format, Metainfo};
use serde::Serialize;

use crate::conn;
use crate::load::Target;

/// The fbpkg-rs tracker's default --max-peers-per-swarm.
const MAX_PEERS_PER_SWARM: usize = 100_000;
/// How long a tracker may take to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Child {
    name: &'static str,
    child: std::process::Child,
    log: PathBuf,
}

impl Child {
    /// Start `cmd` with its output in `log`.
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self { name, child, log })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the process has exited, with the end of its output.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its output ends with:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tracker under test.
#[derive(Debug)]
pub struct Contender {
    /// `fbpkg-rs` or `opentracker`.
    pub name: &'static str,
    /// Where to send announces.
    pub target: Arc<Target>,
    /// The process (dropped before `_dir`, so it is gone before its files are removed).
    pub process: Child,
    /// How it was set up, for the report.
    pub setup: Setup,
    /// When its process was started (periodic stalls are reported from here).
    pub started: Instant,
    _dir: tempfile::TempDir,
}

/// How a contender was set up.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// The program.
    pub binary: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Version, when known.
    pub version: Option<String>,
    /// Swarms it serves.
    pub registered_swarms: usize,
    /// Announces for unknown info-hashes are refused (checked, not assumed).
    pub refuses_unknown_swarms: bool,
    /// Whether it kept connections open between requests (learned during the run).
    pub keeps_connections_alive: Option<bool>,
    /// Anything a reader of the figures should know.
    pub notes: Vec<String>,
}

/// A free TCP port on 127.0.0.1 (the listener is closed before the tracker binds it).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    fbpkg_binary::free_loopback_port().context("finding a free loopback port")
}

/// A scratch directory on tmpfs when there is one, so catalog fsyncs cost nothing.
pub fn scratch_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix(prefix).to_owned();
    let dir = if shm.is_dir() {
        builder.tempdir_in(shm)
    } else {
        builder.tempdir()
    };
    dir.context("creating a scratch directory")
}

/// Tiny packages, one per swarm: `(name, metainfo)`.
pub fn build_packages(count: usize, announce: &str) -> anyhow::Result<Vec<(String, Metainfo)>> {
    (0..count)
        .map(|i| {
            let name = format!("bench-{i:05}");
            let body = format!("fbpkg-rs tracker benchmark package {i}\n");
            let m = Metainfo::build(
                body.as_bytes(),
                body.len() as u64,
                &format!("{name}.bin"),
                announce,
                Format::File,
            )
            .with_context(|| format!("building metainfo for {name}"))?;
            Ok((name, m))
        })
        .collect()
}

/// Inodes of the sockets listening on TCP `port` (IPv4), from /proc/net/tcp.
fn listening_inodes(port: u16) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let wanted = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1, st field 3 (0A = LISTEN), inode field 9.
            (f.len() > 9 && f[1].ends_with(&wanted) && f[3] == "0A").then(|| f[9].to_owned())
        })
        .collect()
}

/// Whether the socket listening on `port` belongs to process `pid`. The port was free when
/// picked, but on a machine where other test suites start trackers on port 0 someone else may
/// take it before our process binds it: then the announces must not go to theirs.
fn listener_belongs_to(pid: u32, port: u16) -> bool {
    let inodes = listening_inodes(port);
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let t = target.to_string_lossy();
            inodes.iter().any(|i| t == format!("socket:[{i}]"))
        })
    })
}

/// Wait until our process accepts connections on `addr` (polling), or dies, or time runs out.
async fn wait_listening(process: &mut Child, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        process.check_alive()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && listener_belongs_to(process.pid(), addr.port())
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} did not listen on {addr} within {READY_TIMEOUT:?}",
            process.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start the fbpkg-rs tracker with `extra` arguments (e.g. `--peer-store URL`) and publish one
/// package per swarm through the catalog API.
pub async fn start_fbpkg(
    binary: &Path,
    packages: &[(String, Metainfo)],
    concurrency: usize,
    extra: &[String],
) -> anyhow::Result<Contender> {
    let dir = scratch_dir("fbpkg-tracker-bench-")?;
    let addr = free_port()?;
    let data_dir = dir.path().join("data");
    let mut args = vec![
        "tracker".to_owned(),
        "--listen".to_owned(),
        addr.to_string(),
        "--data-dir".to_owned(),
        data_dir.display().to_string(),
        // The generator is one address announcing a fleet's worth of made-up peer ids: the
        // limit on peers per address (256 by default) would refuse most of them.
        "--max-peers-per-address".to_owned(),
        MAX_PEERS_PER_SWARM.to_string(),
    ];
    args.extend_from_slice(extra);
    let mut cmd = Command::new(binary);
    // A clean environment: no FBPKG_* or RUST_LOG of the caller may change the setup.
    cmd.args(&args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("FBPKG_LOG", "warn");
    let started = Instant::now();
    let mut process = Child::spawn("fbpkg-rs tracker", cmd, dir.path().join("tracker.log"))?;
    wait_listening(&mut process, addr).await?;
    let publishing = Instant::now();
    publish_all(addr, packages, concurrency).await?;
    process.check_alive()?;
    eprintln!(
        "fbpkg-rs: published {} packages in {:.1} s",
        packages.len(),
        publishing.elapsed().as_secs_f64()
    );
    let version = Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let mut contender = Contender {
        name: "fbpkg-rs",
        target: Arc::new(Target::new(addr)),
        process,
        started,
        setup: Setup {
            binary: binary.display().to_string(),
            args,
            version,
            registered_swarms: packages.len(),
            refuses_unknown_swarms: false,
            keeps_connections_alive: None,
            notes: vec![
                "FBPKG_LOG=warn; swarms registered by publishing one package each \
                 (PUT /api/v1/packages/NAME/SHA256)"
                    .into(),
                format!(
                    "--max-peers-per-address {MAX_PEERS_PER_SWARM} (the per-swarm limit): every \
                     announce comes from 127.0.0.1 with a made-up peer id, which the default \
                     limit of 256 peers per address and swarm exists to refuse"
                ),
            ],
        },
        _dir: dir,
    };
    check_registration(&mut contender, packages).await?;
    Ok(contender)
}

async fn publish_all(
    addr: SocketAddr,
    packages: &[(String, Metainfo)],
    concurrency: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let jobs: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        packages
            .iter()
            .map(|(name, m)| {
                (
                    format!("/api/v1/packages/{name}/{}", m.sha256),
                    m.as_bytes().to_vec(),
                )
            })
            .collect(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (next, jobs) = (next.clone(), jobs.clone());
        tasks.spawn(async move {
            let host = addr.to_string();
            let mut stream = conn::connect(addr).await?;
            let (mut req, mut buf) = (Vec::new(), Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((path, body)) = jobs.get(i) else {
                    return anyhow::Ok(());
                };
                req.clear();
                http1::write_put(&mut req, &host, path, body);
                let reply = tokio::time::timeout(
                    Duration::from_secs(30),
                    conn::exchange(&mut stream, &mut buf, &req),
                )
                .await
                .with_context(|| format!("PUT {path} timed out"))?
                .map_err(|e| anyhow::anyhow!("PUT {path}: {}", e.label()))?;
                ensure!(
                    reply.status == 200 || reply.status == 201,
                    "PUT {path}: HTTP {}: {}",
                    reply.status,
                    String::from_utf8_lossy(&buf[reply.body.clone()])
                );
                if reply.close {
                    stream = conn::connect(addr).await?;
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("a publishing task panicked")??;
    }
    Ok(())
}

/// Start Debian's opentracker with a whitelist of the swarms.
pub async fn start_opentracker(binary: &Path, hashes: &[InfoHash]) -> anyhow::Result<Contender> {
    let dir = scratch_dir("opentracker-bench-")?;
    let addr = free_port()?;
    let whitelist = dir.path().join("whitelist.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&whitelist)?);
        for h in hashes {
            writeln!(f, "{}", h.to_hex())?;
        }
        f.flush()?;
    }
    // opentracker chroots into -d and drops to `nobody` when started as root: both the
    // directory and the list must be readable by that user.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&whitelist, std::fs::Permissions::from_mode(0o644))?;
    }
    // -i before -p: the address applies to the ports named after it. No -P: no UDP socket.
    let args = vec![
        "-i".to_owned(),
        "127.0.0.1".to_owned(),
        "-p".to_owned(),
        addr.port().to_string(),
        "-d".to_owned(),
        dir.path().display().to_string(),
        "-w".to_owned(),
        "whitelist.txt".to_owned(),
    ];
    let mut cmd = Command::new(binary);
    cmd.args(&args).current_dir(dir.path());
    let started = Instant::now();
    let mut process = Child::spawn("opentracker", cmd, dir.path().join("opentracker.log"))?;
    wait_listening(&mut process, addr).await?;
    let version = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "opentracker"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| format!("Debian {}", String::from_utf8_lossy(&o.stdout).trim()));
    let mut contender = Contender {
        name: "opentracker",
        target: Arc::new(Target::new(addr)),
        process,
        started,
        setup: Setup {
            binary: binary.display().to_string(),
            args,
            version,
            registered_swarms: hashes.len(),
            refuses_unknown_swarms: false,
            keeps_connections_alive: None,
            notes: vec![
                "Debian builds opentracker with WANT_ACCESSLIST_WHITE (README.Debian): \
                 whitelist given with -w, one hex info-hash per line"
                    .into(),
            ],
        },
        _dir: dir,
    };
    // The whitelist is loaded by a thread of its own after start-up: wait until it admits.
    let ready = Instant::now() + READY_TIMEOUT;
    let workload = Workload::new(hashes.to_vec()).context("no swarms")?;
    loop {
        contender.process.check_alive()?;
        match announce_once(contender.target.addr, &workload, None).await? {
            Outcome::Ok { .. } => break,
            other => ensure!(
                Instant::now() < ready,
                "opentracker still refuses a whitelisted swarm after {READY_TIMEOUT:?}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_registration(&mut contender, &[]).await?;
    Ok(contender)
}

/// One announce on a fresh connection: a random registered swarm, or `hash`.
async fn announce_once(
    addr: SocketAddr,
    workload: &Workload,
    hash: Option<InfoHash>,
) -> anyhow::Result<Outcome> {
    let mut announce = workload.random(&mut rand::rng());
    if let Some(h) = hash {
        announce.info_hash = h;
    }
    let mut req = Vec::new();
    write_announce(&mut req, &addr.to_string(), &announce, true);
    let mut stream = conn::connect(addr).await?;
    let mut buf = Vec::new();
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        conn::exchange(&mut stream, &mut buf, &req),
    )
    .await
    .context("announce timed out")?
    .map_err(|e| anyhow::anyhow!("announce: {}", e.label()))?;
    Ok(classify(reply.status, &buf[reply.body]))
}

/// Check that a registered swarm is served and an unknown one refused.
async fn check_registration(
    contender: &mut Contender,
    packages: &[(String, Metainfo)],
) -> anyhow::Result<()> {
    let addr = contender.target.addr;
    let registered: Vec<InfoHash> = packages.iter().map(|(_, m)| m.info_hash).collect();
    if let Some(workload) = Workload::new(registered) {
        let got = announce_once(addr, &workload, None).await?;
        ensure!(
            matches!(got, Outcome::Ok { .. }),
            "{} refused a registered swarm: {got:?}",
            contender.name
        );
    }
    let probe = Workload::new(vec![InfoHash([0xEE; 20])]).context("probe workload")?;
    let unknown = announce_once(addr, &probe, Some(InfoHash([0xEE; 20]))).await?;
    contender.setup.refuses_unknown_swarms = matches!(unknown, Outcome::Failure(_));
    if !contender.setup.refuses_unknown_swarms {
        contender.setup.notes.push(format!(
            "WARNING: an unknown info-hash was not refused ({unknown:?}): this tracker runs open"
        ));
    }
    Ok(())
}

/// Where opentracker is, if installed.
pub fn find_opentracker(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("opentracker"))
        .find(|p| p.is_file())
        .context(
            "opentracker is not installed: `apt-get update && apt-get install -y opentracker` \
             (or pass --opentracker-bin PATH)",
        )
}

/// Note on each contender whether it kept connections alive during the run.
pub fn learn_keep_alive(contenders: &mut [Contender]) {
    for c in contenders {
        let closes = c.target.server_closes.load(Ordering::Relaxed);
        c.setup.keeps_connections_alive = Some(!closes);
        if closes {
            c.setup.notes.push(
                "closes the connection after every response even to HTTP/1.1 keep-alive \
                 requests (without saying `Connection: close`): its keep-alive figures are \
                 with a new connection per request"
                    .into(),
            );
        }
    }
}
