//! A network namespace the test creates, for a client that will not dial loopback peers.
//!
//! Transmission treats 127.0.0.0/8 as a martian address: it never connects to a peer there,
//! so it can only download when the peers it dials have another address. The namespace gets
//! one end of a veth pair, the root namespace the other:
//!
//! ```text
//!   root namespace                       fbix-<pid>-<n>
//!   fbix<pid>n<n>  198.19.S.1/24  <-->  eth0  198.19.S.2/24, 198.19.S.3/24, ...
//!   (our tracker, our agents)            (the stock clients, one address each)
//! ```
//!
//! Only RFC 2544's benchmarking range is used (198.18.0.0/15; the swarm bench keeps to
//! 198.18.0.0/24 inside its own namespaces, this takes a free 198.19.S.0/24), nothing routes
//! beyond the pair, and everything is removed on drop, the namespace first (its processes must
//! be gone by then: declare the [`TestNet`] before the clients that run in it). Names carry the
//! test's process id, so what a killed run left is removed by the next one.
//!
//! Needs root (CI runs as root) and `ip` from iproute2.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Every namespace and root-side link this suite creates starts with this.
const PREFIX: &str = "fbix";
/// Longest one `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Serialises the choice of a subnet and the creation within this process.
static CREATE: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace joined to the root namespace by a veth pair. Removed on drop.
#[derive(Debug)]
pub struct TestNet {
    ns: String,
    root_dev: String,
    subnet: u8,
    hosts: u8,
}

impl TestNet {
    /// Why this machine cannot make one, if it cannot: not root, or no `ip`.
    pub fn unavailable() -> Option<String> {
        if !is_root() {
            return Some(
                "not running as root (network namespaces need it; CI runs as root)".into(),
            );
        }
        if !on_path("ip") {
            return Some("ip (iproute2) not installed".into());
        }
        None
    }

    /// Create a namespace with `hosts` addresses (198.19.S.2 up to 198.19.S.(hosts + 1)).
    pub fn create(hosts: u8) -> Result<Self, String> {
        assert!((1..=100).contains(&hosts), "1 to 100 host addresses");
        let _one_at_a_time = CREATE.lock().unwrap_or_else(|p| p.into_inner());
        remove_leftovers();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let subnet = free_subnet(pid, n)?;
        let mut net = Self {
            ns: format!("{PREFIX}-{pid}-{n}"),
            root_dev: format!("{PREFIX}{pid}n{n}"),
            subnet,
            hosts,
        };
        ip(&["netns", "add", &net.ns])?;
        let built = (|| {
            let ns = net.ns.clone();
            let dev = net.root_dev.clone();
            ip(&[
                "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/24", net.root_addr()),
                "dev",
                &dev,
            ])?;
            ip(&["link", "set", &dev, "up"])?;
            for i in 0..hosts {
                let addr = format!("{}/24", net.host_addr(i));
                ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])
        })();
        if let Err(e) = built {
            net.remove();
            return Err(e);
        }
        Ok(net)
    }

    /// The root namespace's address on the pair: where our tracker and agents listen.
    pub fn root_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.subnet, 1)
    }

    /// The `i`th address inside the namespace (from 0).
    pub fn host_addr(&self, i: u8) -> Ipv4Addr {
        assert!(i < self.hosts, "host {i} of {}", self.hosts);
        Ipv4Addr::new(198, 19, self.subnet, 2 + i)
    }

    /// `program` run inside the namespace (`ip netns exec NS program`, which execs it: the
    /// child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    fn remove(&mut self) {
        // Deleting the namespace destroys its end of the pair and so the root end; delete the
        // root end too in case a process still holds the namespace open.
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.root_dev]);
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A /24 in 198.19.0.0/16 that no address in the root namespace is in yet.
fn free_subnet(pid: u32, n: u32) -> Result<u8, String> {
    let out = run("ip", &["-o", "-4", "addr", "show"])?;
    let used = |s: u32| out.contains(&format!("inet 198.19.{s}."));
    let start = (pid.wrapping_mul(7).wrapping_add(n)) % 254;
    (0..254)
        .map(|k| (start + k) % 254 + 1)
        .find(|s| !used(*s))
        .and_then(|s| u8::try_from(s).ok())
        .ok_or_else(|| "no free 198.19.x.0/24 in the root namespace".into())
}

/// Remove the namespaces (and their root-side links) of earlier test processes that died
/// without cleaning up.
fn remove_leftovers() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let mut parts = rest.splitn(2, '-');
        let (Some(pid), Some(n)) = (parts.next(), parts.next()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = ip(&["netns", "del", name]);
        let _ = ip(&["link", "del", &format!("{PREFIX}{pid}n{n}")]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args).map(drop)
}

/// Run `program args` to completion within [`IP_TIMEOUT`]; its stdout, or why it failed.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let shown = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    let deadline = Instant::now() + IP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown}: no answer within {IP_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("{shown}: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{shown}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Effective uid 0: `/proc/self` belongs to the effective user (no `unsafe` geteuid needed).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Whether `program` is an executable file on `$PATH`.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}
