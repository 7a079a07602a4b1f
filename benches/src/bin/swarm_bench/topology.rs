//! Building and removing the network of [`Plan`], and reading its counters.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use fbpkg_benches::swarm::netplan::{HOST_DEV, Plan, SWITCH_NS};
use fbpkg_benches::swarm::procfs::{self, DevBytes};

use crate::cleanup;
use crate::procs::{self, Proc, Spec};

const CMD_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a contender's process runs and listens.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `seed`, `l001`, `trk`.
    pub label: String,
    /// Its namespace.
    pub ns: String,
    /// Its address.
    pub ip: std::net::Ipv4Addr,
    /// Added to every port it listens on (0 on the bridge, where every host has its own
    /// address; the host's index on shared loopback).
    pub port_shift: u16,
}

impl Endpoint {
    /// `ip:(base + shift)`.
    pub fn addr(&self, base: u16) -> String {
        format!("{}:{}", self.ip, base + self.port_shift)
    }
}

/// The hosts a contender runs on.
#[derive(Debug, Clone)]
pub struct Hosts {
    /// Holds the package.
    pub seed: Endpoint,
    /// Ask for it.
    pub leechers: Vec<Endpoint>,
    /// Hold the packages after the first, one each (B5); empty in one-package scenarios.
    pub origins: Vec<Endpoint>,
    /// Runs the tracker.
    pub tracker: Endpoint,
}

/// The namespaces of a plan, created; removed on drop.
#[derive(Debug)]
pub struct Topology {
    /// What was built.
    pub plan: Plan,
    created: Vec<String>,
    /// The neighbour-table limits found before the bench raised them, to put back.
    neigh_limits: Option<[String; 3]>,
    /// A `sleep` in the switch namespace: its `/proc/PID/net/dev` gives every switch-side
    /// counter in one read, without starting a process per sample.
    watcher: Option<Proc>,
}

impl Topology {
    /// Build the network; on error, whatever was built is removed.
    pub fn create(plan: Plan) -> anyhow::Result<Self> {
        let mut topo = Self {
            plan,
            created: Vec::new(),
            neigh_limits: None,
            watcher: None,
        };
        topo.neigh_limits = raise_neighbour_limits(topo.plan.neighbour_entries())?;
        for cmd in topo.plan.setup_commands() {
            if let ["ip", "netns", "add", ns] =
                cmd.iter().map(String::as_str).collect::<Vec<_>>()[..]
            {
                topo.created.push(ns.to_owned());
            }
            procs::check_cancelled()?;
            procs::run_ok(Spec::new(cmd.join(" "), None, &cmd), CMD_TIMEOUT)?;
        }
        topo.watcher = Some(Proc::spawn(Spec::new(
            "switch watcher",
            Some(SWITCH_NS),
            ["sleep", "1000000"],
        ))?);
        Ok(topo)
    }

    /// The hosts as contenders see them.
    pub fn hosts(&self) -> Hosts {
        let ep = |h: &fbpkg_benches::swarm::netplan::Host| Endpoint {
            label: h.label.clone(),
            ns: h.ns.clone(),
            ip: h.ip,
            port_shift: 0,
        };
        Hosts {
            seed: ep(self.plan.seed()),
            leechers: self.plan.leechers().iter().map(ep).collect(),
            origins: self.plan.origins().iter().map(ep).collect(),
            tracker: ep(self.plan.tracker()),
        }
    }

    /// (host label, switch-side interface) of every host.
    pub fn labels(&self) -> Vec<(String, String)> {
        self.plan
            .hosts
            .iter()
            .map(|h| (h.label.clone(), h.switch_dev.clone()))
            .collect()
    }

    /// Every switch-side interface's counters now.
    pub fn switch_counters(&self) -> anyhow::Result<BTreeMap<String, DevBytes>> {
        let pid = self.watcher.as_ref().context("no switch watcher")?.pid;
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
            .context("reading the switch namespace's /proc/net/dev")?;
        Ok(procfs::parse_net_dev(&text))
    }

    /// `tx_bytes` of the host-side interface of the host in `ns`, read from /sys/class/net
    /// inside that namespace (`ip netns exec` mounts that namespace's /sys).
    pub fn host_tx_bytes(&self, ns: &str) -> anyhow::Result<u64> {
        let path = format!("/sys/class/net/{HOST_DEV}/statistics/tx_bytes");
        let out = procs::run_ok(
            Spec::new("read tx_bytes", Some(ns), ["cat", path.as_str()]),
            CMD_TIMEOUT,
        )?;
        out.trim()
            .parse()
            .with_context(|| format!("tx_bytes of {ns}: {out:?}"))
    }

    /// Bytes the upload cap of the host in `ns` has sent (its `tbf`, or the root `htb` of
    /// `--queue small-first`). Unlike the veth's `tx_bytes`, which counts a GSO super-packet's
    /// headers once, the qdisc counts every segment's headers: these are the bytes the cap
    /// was applied to.
    pub fn host_tbf_bytes(&self, ns: &str) -> anyhow::Result<u64> {
        let out = procs::run_ok(
            Spec::new(
                "tc -s qdisc",
                None,
                ["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", HOST_DEV],
            ),
            CMD_TIMEOUT,
        )?;
        let v: serde_json::Value = serde_json::from_str(&out).context("tc -j output")?;
        v.as_array()
            .into_iter()
            .flatten()
            .find(|q| q["kind"] == "tbf" || (q["kind"] == "htb" && q["root"] == true))
            .and_then(|q| q["bytes"].as_u64())
            .with_context(|| format!("no cap on {ns}: {out}"))
    }

    /// `tc -s qdisc` of every namespace (drops, overlimits), for the logs.
    pub fn qdisc_stats(&self) -> String {
        let mut out = String::new();
        for ns in &self.created {
            let text = procs::run_ok(
                Spec::new("tc -s qdisc", None, ["tc", "-n", ns, "-s", "qdisc", "show"]),
                CMD_TIMEOUT,
            )
            .unwrap_or_else(|e| format!("{e:#}\n"));
            out.push_str(&format!("== {ns}\n{text}"));
        }
        out
    }
}

/// Read a sysctl inside a namespace (e.g. the TCP congestion control in use there).
pub fn sysctl_in(ns: &str, path: &str) -> String {
    procs::run_ok(
        Spec::new("read sysctl", Some(ns), ["cat", path]),
        CMD_TIMEOUT,
    )
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|e| format!("unknown ({e})"))
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut w) = self.watcher.take() {
            w.kill();
        }
        for ns in self.created.iter().rev() {
            cleanup::delete_namespace(ns);
        }
        if let Some(old) = self.neigh_limits.take() {
            for (path, value) in NEIGH_LIMITS.iter().zip(old) {
                let _ = std::fs::write(path, value);
            }
        }
    }
}

/// The kernel's neighbour (ARP) table limits: one table for every namespace.
const NEIGH_LIMITS: [&str; 3] = [
    "/proc/sys/net/ipv4/neigh/default/gc_thresh1",
    "/proc/sys/net/ipv4/neigh/default/gc_thresh2",
    "/proc/sys/net/ipv4/neigh/default/gc_thresh3",
];

/// Make room for `entries` ARP entries (see `Plan::neighbour_entries`), twice over, and
/// keep them from being collected mid-run; returns the old limits when it changed them.
fn raise_neighbour_limits(entries: usize) -> anyhow::Result<Option<[String; 3]>> {
    let read = |p: &str| -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(p)
            .with_context(|| format!("reading {p}"))?
            .trim()
            .to_owned())
    };
    let old = [
        read(NEIGH_LIMITS[0])?,
        read(NEIGH_LIMITS[1])?,
        read(NEIGH_LIMITS[2])?,
    ];
    let hard: usize = old[2].parse().unwrap_or(0);
    if hard >= 2 * entries {
        return Ok(None);
    }
    let want = [entries, 2 * entries, 4 * entries];
    for (i, (path, v)) in NEIGH_LIMITS.iter().zip(want).enumerate() {
        let current: usize = old[i].parse().unwrap_or(0);
        std::fs::write(path, current.max(v).to_string())
            .with_context(|| format!("raising {path} for {entries} ARP entries"))?;
    }
    eprintln!(
        "swarm_bench: neighbour table limits raised to {}/{}/{} for {entries} ARP entries (restored at the end)",
        old[0].parse::<usize>().unwrap_or(0).max(want[0]),
        old[1].parse::<usize>().unwrap_or(0).max(want[1]),
        old[2].parse::<usize>().unwrap_or(0).max(want[2]),
    );
    Ok(Some(old))
}

/// One namespace with only loopback (the `--cpu` mode); removed on drop.
#[derive(Debug)]
pub struct LoopbackNs {
    /// Its name.
    pub ns: String,
}

impl LoopbackNs {
    /// Create `fbsb-cpu` with `lo` up.
    pub fn create() -> anyhow::Result<Self> {
        let ns = format!("{}cpu", fbpkg_benches::swarm::netplan::NS_PREFIX);
        procs::run_ok(
            Spec::new("ip netns add", None, ["ip", "netns", "add", ns.as_str()]),
            CMD_TIMEOUT,
        )?;
        let me = Self { ns };
        procs::run_ok(
            Spec::new(
                "lo up",
                None,
                ["ip", "-n", me.ns.as_str(), "link", "set", "lo", "up"],
            ),
            CMD_TIMEOUT,
        )?;
        Ok(me)
    }

    /// Seed, `n` leechers and the tracker, all on 127.0.0.1 with ports shifted apart.
    pub fn hosts(&self, n: usize) -> Hosts {
        let ep = |label: String, shift: usize| Endpoint {
            label,
            ns: self.ns.clone(),
            ip: std::net::Ipv4Addr::LOCALHOST,
            port_shift: u16::try_from(shift).unwrap_or(u16::MAX),
        };
        Hosts {
            seed: ep("seed".into(), 0),
            leechers: (1..=n).map(|i| ep(format!("l{i:03}"), i)).collect(),
            origins: Vec::new(),
            tracker: ep("trk".into(), 0),
        }
    }
}

impl Drop for LoopbackNs {
    fn drop(&mut self) {
        cleanup::delete_namespace(&self.ns);
    }
}
