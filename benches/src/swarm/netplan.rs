//! The benchmark's network, written down before anything is created: which namespaces, which
//! addresses, which veth ends, and the `ip`/`tc` commands that build it.
//!
//! ```text
//!   fbsb-seed        fbsb-l001 ... fbsb-lNNN        fbsb-trk
//!   eth0 198.18.0.1  eth0 198.18.0.2 ...            eth0 198.18.0.254
//!    | tbf = upload   | tbf = upload                 | (uncapped)
//!    |                |                              |
//!   s-seed           s-l001 ...                     s-trk        <- in fbsb-sw, on bridge br0
//!    tbf = download   tbf = download
//! ```
//!
//! A `tbf` qdisc shapes what leaves an interface, so the host-side end caps the host's upload
//! and the switch-side end caps its download. Only 198.18.0.0/24 is used (RFC 2544's
//! benchmarking range), and nothing is added to the root namespace: every command names its
//! namespace with `-n`.

use std::net::Ipv4Addr;

use serde::Serialize;

use super::scenario::Scenario;

/// Every namespace this benchmark creates starts with this, so a later run can find and
/// remove what a crashed one left.
pub const NS_PREFIX: &str = "fbsb-";
/// The switch namespace (holds the bridge).
pub const SWITCH_NS: &str = "fbsb-sw";
/// The bridge inside the switch namespace.
pub const BRIDGE: &str = "br0";
/// The host-side interface name in every host namespace.
pub const HOST_DEV: &str = "eth0";
/// Prefix length of the host addresses.
pub const PREFIX_LEN: u8 = 24;

/// Token-bucket parameters shared by every cap.
///
/// `burst` is the bucket: how many bytes may leave back to back at line rate. It must hold at
/// least one MTU-sized frame; a few tens of KiB let a TCP flow keep the link busy across timer
/// granularity without letting through visible bursts (32 KiB is 1.6 ms at 160 Mbit/s).
/// `latency` sizes the queue behind the bucket: packets that do not fit are dropped, which is
/// the signal TCP's congestion control needs. `tc` turns it into a byte limit of rate x
/// latency + burst (iproute2's `q_tbf.c`), so the queue holds 50 ms plus the bucket: 53 ms at
/// 80 Mbit/s with the 32 KiB bucket, but with [`Tbf::FLEET_BURST`] 76 ms at 40 Mbit/s, 102 ms
/// at 20 and 260 ms at 5. A limit of rate x latency alone is smaller than one GSO packet at
/// the thin rates, and a tbf drops such a packet whole: one flow through a 5 Mbit/s cap then
/// got 4% of it (`benches/FINDINGS.md`, "A thin uplink's first seconds"). The queue is a
/// FIFO ([`Queue::Fifo`]) unless [`Queue::SmallFirst`] says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tbf {
    /// Bucket size, bytes.
    pub burst_bytes: u32,
    /// Queue behind the bucket, in milliseconds at the cap's rate (see above: the bucket's
    /// bytes queue too).
    pub latency_ms: u32,
    /// What order the queue behind the cap sends in.
    pub queue: Queue,
}

impl Default for Tbf {
    fn default() -> Self {
        Self {
            burst_bytes: 32 << 10,
            latency_ms: 50,
            queue: Queue::Fifo,
        }
    }
}

/// The order in which a cap's queue sends.
///
/// BENCHMARKS.md's links are a `tbf` with a FIFO behind it, and there a host's downloads pay
/// for its uploads: the ACKs of what it receives, and its requests, wait behind everything it
/// is uploading (up to 260 ms at a 5 Mbit/s uplink; `benches/FINDINGS.md`, "A thin uplink's
/// first seconds"). A stock Linux host queues in `fq_codel` or `fq`, where such sparse flows go
/// first; this kernel has neither (nor `sfq` or `prio`), but it has `htb` and the `u32`
/// classifier, which can send small packets first at the same rate. Measured in `b3`, it gave
/// the thin-uplink hosts nothing back: at a quarter of the rates they came later with it
/// (a mean of 170.5 and 172.7 s against 163.7–165.2 s), the bulk queues dropped four times
/// as many packets, and the mean host did not move. Pure ACKs alone first (an experiment
/// build) gave the thin hosts 1–3 s and cost the others 8 (`benches/FINDINGS.md`, "Small
/// packets first").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Queue {
    /// One FIFO behind a `tbf` (BENCHMARKS.md's links).
    Fifo,
    /// An `htb` cap with two FIFOs of the tbf's size behind it: IPv4 packets under 128 bytes
    /// (pure ACKs, requests, `have`s) are sent before the rest, as a fair queue sends a sparse
    /// flow's packets first; unlike one, it also sends a connection's small segment ahead of
    /// the large ones queued before it. Not BENCHMARKS.md's topology: it says what the FIFO
    /// costs.
    SmallFirst,
}

/// Packets shorter than this (IPv4 total length) go first under [`Queue::SmallFirst`]: a pure
/// ACK with timestamps is 52 bytes, with three SACK blocks 80; a `have` or a request with its
/// headers 61 and 69.
pub const SMALL_PACKET: u16 = 128;

impl Tbf {
    /// Bucket of the fleet-scale scenarios (more than [`Tbf::FLEET_LEECHERS`] leechers).
    ///
    /// A tbf splits every GSO packet larger than its bucket into MTU-sized frames in software
    /// (`tbf_segment`), and each frame then crosses the bridge and the other cap on its own.
    /// With 32 KiB buckets, 48 hosts on 2 cores spent most of the run doing that: the
    /// emulation, not the contenders, set the time. 128 KiB holds a 64 KiB GSO packet whole.
    /// Rates are unchanged (a single flow still measures 0.956 of the cap in payload; the
    /// calibration table of every run shows it) and the extra burst is 52 ms of a 20 Mbit/s
    /// link, once per idle period: under 0.2% of a 64 MiB transfer.
    pub const FLEET_BURST: u32 = 128 << 10;
    /// Scenarios with more leechers than this use [`Tbf::FLEET_BURST`].
    pub const FLEET_LEECHERS: usize = 16;

    /// The shaping a scenario of `leechers` runs with unless `--tbf-burst` says otherwise.
    pub fn for_leechers(leechers: usize, latency_ms: u32) -> Self {
        let burst_bytes = if leechers > Self::FLEET_LEECHERS {
            Self::FLEET_BURST
        } else {
            Self::default().burst_bytes
        };
        Self {
            burst_bytes,
            latency_ms,
            queue: Queue::Fifo,
        }
    }
}

/// What a host does in the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Holds the package at the start.
    Seed,
    /// Asks for the package; numbered from 1.
    Leecher(usize),
    /// Holds package k (numbered from 2; the seed holds the first) in many-package
    /// scenarios (B5).
    Origin(usize),
    /// Runs the tracker (uncapped).
    Tracker,
}

/// One host: a namespace with one veth pair to the switch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Host {
    /// Its role.
    pub role: Role,
    /// Short label: `seed`, `l001`, `trk`.
    pub label: String,
    /// Network namespace.
    pub ns: String,
    /// Address on the bridge.
    pub ip: Ipv4Addr,
    /// The veth end in the switch namespace.
    pub switch_dev: String,
    /// Upload cap (tbf on the host-side end), bit/s; `None` = uncapped.
    pub up_bps: Option<u64>,
    /// Download cap (tbf on the switch-side end), bit/s; `None` = uncapped.
    pub down_bps: Option<u64>,
}

/// The whole network of one scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Seed first, then the leechers in order, then the tracker.
    pub hosts: Vec<Host>,
    /// Shaping parameters.
    pub tbf: Tbf,
}

fn host(role: Role, ip: Ipv4Addr, up: Option<u64>, down: Option<u64>) -> Host {
    let label = match role {
        Role::Seed => "seed".to_owned(),
        Role::Leecher(i) => format!("l{i:03}"),
        Role::Origin(k) => format!("o{k}"),
        Role::Tracker => "trk".to_owned(),
    };
    Host {
        role,
        ns: format!("{NS_PREFIX}{label}"),
        switch_dev: format!("s-{label}"),
        label,
        ip,
        up_bps: up,
        down_bps: down,
    }
}

/// `ip`-style argument vector from string slices.
fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// `tc -n NS qdisc replace dev DEV root tbf rate <bps>bit burst <bytes> latency <ms>ms`.
///
/// Rates are written in bit/s so there is no doubt about tc's unit prefixes.
pub fn tbf_command(ns: &str, dev: &str, rate_bps: u64, tbf: Tbf) -> Vec<String> {
    vec![
        "tc".into(),
        "-n".into(),
        ns.into(),
        "qdisc".into(),
        "replace".into(),
        "dev".into(),
        dev.into(),
        "root".into(),
        "tbf".into(),
        "rate".into(),
        format!("{rate_bps}bit"),
        "burst".into(),
        tbf.burst_bytes.to_string(),
        "latency".into(),
        format!("{}ms", tbf.latency_ms),
    ]
}

/// The commands that cap what leaves `dev` in `ns` at `rate_bps`, with `tbf`'s bucket and
/// queue: one `tbf` ([`tbf_command`]) for [`Queue::Fifo`]; for [`Queue::SmallFirst`], an
/// `htb` class at the rate over two leaf classes, small packets (prio 0) and the rest (prio
/// 1), each with a byte FIFO as long as the tbf's (rate x latency + bucket).
pub fn cap_commands(ns: &str, dev: &str, rate_bps: u64, tbf: Tbf) -> Vec<Vec<String>> {
    match tbf.queue {
        Queue::Fifo => vec![tbf_command(ns, dev, rate_bps, tbf)],
        Queue::SmallFirst => {
            // Every argument is one word: `ns` and `dev` are interface and namespace names.
            let tc = |args: String| -> Vec<String> {
                ["tc", "-n", ns]
                    .into_iter()
                    .chain(args.split_whitespace())
                    .map(str::to_owned)
                    .collect()
            };
            // The small packets' guaranteed share; they borrow up to the whole rate first.
            let small = rate_bps / 10;
            let bulk = rate_bps - small;
            let burst = tbf.burst_bytes;
            let limit = rate_bps * u64::from(tbf.latency_ms) / 8_000 + u64::from(burst);
            let leaf = |id: u32, rate: u64, prio: u32| {
                tc(format!(
                    "class add dev {dev} parent 1:1 classid 1:{id} htb rate {rate}bit \
                     ceil {rate_bps}bit burst {burst} cburst {burst} prio {prio} quantum 1514"
                ))
            };
            let fifo = |id: u32| {
                tc(format!(
                    "qdisc add dev {dev} parent 1:{id} handle {id}: bfifo limit {limit}"
                ))
            };
            vec![
                tc(format!(
                    "qdisc replace dev {dev} root handle 1: htb default 20"
                )),
                tc(format!(
                    "class add dev {dev} parent 1: classid 1:1 htb rate {rate_bps}bit \
                     ceil {rate_bps}bit burst {burst} cburst {burst}"
                )),
                leaf(10, small, 0),
                leaf(20, bulk, 1),
                fifo(10),
                fifo(20),
                // The IPv4 total length (bytes 2-3 of the header) under SMALL_PACKET.
                tc(format!(
                    "filter add dev {dev} parent 1: protocol ip prio 1 u32 \
                     match u16 0x0000 {:#06x} at 2 flowid 1:10",
                    !(SMALL_PACKET - 1)
                )),
            ]
        }
    }
}

impl Plan {
    /// The network of `scenario`: seed at .1, leecher i at .(1+i), tracker at .254.
    pub fn new(scenario: &Scenario, tbf: Tbf) -> Self {
        let c = &scenario.caps;
        let mut hosts = vec![host(
            Role::Seed,
            Ipv4Addr::new(198, 18, 0, 1),
            Some(c.seed_up_bps),
            Some(c.leecher_down_bps),
        )];
        for i in 1..=scenario.leechers {
            let last = u8::try_from(1 + i).unwrap_or(u8::MAX);
            hosts.push(host(
                Role::Leecher(i),
                Ipv4Addr::new(198, 18, 0, last),
                Some(scenario.leecher_up_bps(i)),
                Some(scenario.leecher_down_bps(i)),
            ));
        }
        for k in 2..=scenario.packages {
            let last = u8::try_from(249 + k).unwrap_or(u8::MAX);
            hosts.push(host(
                Role::Origin(k),
                Ipv4Addr::new(198, 18, 0, last),
                Some(c.seed_up_bps),
                Some(c.leecher_down_bps),
            ));
        }
        hosts.push(host(
            Role::Tracker,
            Ipv4Addr::new(198, 18, 0, 254),
            None,
            None,
        ));
        Self { hosts, tbf }
    }

    /// The seed host.
    pub fn seed(&self) -> &Host {
        &self.hosts[0]
    }

    /// The tracker host.
    pub fn tracker(&self) -> &Host {
        &self.hosts[self.hosts.len() - 1]
    }

    /// The leecher hosts, in order.
    pub fn leechers(&self) -> &[Host] {
        let n = self
            .hosts
            .iter()
            .filter(|h| matches!(h.role, Role::Leecher(_)))
            .count();
        &self.hosts[1..1 + n]
    }

    /// The origins of the packages after the first (whose origin is the seed), in order.
    pub fn origins(&self) -> &[Host] {
        let n = self.leechers().len();
        &self.hosts[1 + n..self.hosts.len() - 1]
    }

    /// ARP entries the hosts need when every host talks to every other: one per (host, peer)
    /// pair, each in the sender's namespace.
    ///
    /// Why it matters: the kernel's neighbour table is one table for all namespaces, capped
    /// at `net.ipv4.neigh.default.gc_thresh3` entries (1,024 by default). 50 hosts in a full
    /// mesh need about 2,450; past the cap new entries fail ("neighbor table overflow!" in the
    /// kernel log), connects fail with EHOSTUNREACH or time out, and the hosts that came last
    /// are cut off. That, not the swarm, was the first 48-host failure. One real host holds
    /// only its own peers, so only the bench needs this.
    pub fn neighbour_entries(&self) -> usize {
        let n = self.hosts.len();
        n * n.saturating_sub(1)
    }

    /// Every namespace, the switch first.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(SWITCH_NS.to_owned())
            .chain(self.hosts.iter().map(|h| h.ns.clone()))
            .collect()
    }

    /// The commands that build the network, in order.
    pub fn setup_commands(&self) -> Vec<Vec<String>> {
        let sw = SWITCH_NS;
        let mut cmds = vec![
            argv(&["ip", "netns", "add", sw]),
            argv(&["ip", "-n", sw, "link", "set", "lo", "up"]),
            argv(&["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge"]),
            argv(&["ip", "-n", sw, "link", "set", BRIDGE, "up"]),
            // Where br_netfilter is loaded, every bridged packet also goes through iptables:
            // about 6% of the machine's CPU at 48 hosts, for a switch that filters nothing.
            // Per namespace, so only our switch is changed; -e: fine where the keys are absent.
            argv(&[
                "ip",
                "netns",
                "exec",
                sw,
                "sysctl",
                "-qew",
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0",
                "net.bridge.bridge-nf-call-arptables=0",
            ]),
        ];
        for h in &self.hosts {
            let (ns, sdev) = (h.ns.as_str(), h.switch_dev.as_str());
            let addr = format!("{}/{PREFIX_LEN}", h.ip);
            cmds.extend([
                argv(&["ip", "netns", "add", ns]),
                argv(&["ip", "-n", ns, "link", "set", "lo", "up"]),
                argv(&[
                    "ip", "-n", sw, "link", "add", sdev, "type", "veth", "peer", "name", HOST_DEV,
                    "netns", ns,
                ]),
                argv(&["ip", "-n", sw, "link", "set", sdev, "master", BRIDGE]),
                argv(&["ip", "-n", sw, "link", "set", sdev, "up"]),
                argv(&["ip", "-n", ns, "addr", "add", &addr, "dev", HOST_DEV]),
                argv(&["ip", "-n", ns, "link", "set", HOST_DEV, "up"]),
            ]);
            if let Some(up) = h.up_bps {
                cmds.extend(cap_commands(ns, HOST_DEV, up, self.tbf));
            }
            if let Some(down) = h.down_bps {
                cmds.extend(cap_commands(sw, sdev, down, self.tbf));
            }
        }
        cmds
    }

    /// The commands that remove it (deleting a namespace deletes its veth ends and qdiscs).
    pub fn teardown_commands(&self) -> Vec<Vec<String>> {
        self.namespaces()
            .iter()
            .rev()
            .map(|ns| argv(&["ip", "netns", "del", ns]))
            .collect()
    }
}

/// Whether a namespace name (a line of `ip netns list`) is one of ours.
pub fn is_ours(ns_list_line: &str) -> Option<&str> {
    let name = ns_list_line.split_whitespace().next()?;
    name.starts_with(NS_PREFIX).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(cmd: &[String]) -> String {
        cmd.join(" ")
    }

    #[test]
    fn tbf_command_is_explicit_about_units() {
        let c = tbf_command("fbsb-seed", "eth0", 80_000_000, Tbf::default());
        assert_eq!(
            joined(&c),
            "tc -n fbsb-seed qdisc replace dev eth0 root tbf rate 80000000bit burst 32768 latency 50ms"
        );
    }

    #[test]
    fn b1_plan() {
        let plan = Plan::new(&Scenario::preset("b1").unwrap(), Tbf::default());
        assert_eq!(plan.hosts.len(), 10);
        assert_eq!(plan.seed().ip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(plan.leechers().len(), 8);
        assert_eq!(plan.leechers()[7].ip, Ipv4Addr::new(198, 18, 0, 9));
        assert_eq!(plan.leechers()[0].ns, "fbsb-l001");
        assert_eq!(plan.leechers()[0].switch_dev, "s-l001");
        assert_eq!(plan.tracker().ip, Ipv4Addr::new(198, 18, 0, 254));
        assert_eq!(plan.tracker().up_bps, None);
        for ns in plan.namespaces() {
            assert!(ns.starts_with(NS_PREFIX) && ns.len() <= 15, "{ns}");
        }
        for h in &plan.hosts {
            assert!(
                h.switch_dev.len() <= 15,
                "interface names are at most 15 bytes"
            );
        }
    }

    #[test]
    fn b3_plan_caps_every_third_leecher_at_the_slow_uplink() {
        let plan = Plan::new(&Scenario::preset("b3").unwrap(), Tbf::for_leechers(48, 50));
        let ups: Vec<Option<u64>> = plan.leechers().iter().map(|h| h.up_bps).collect();
        assert_eq!(ups.len(), 48);
        assert_eq!(ups.iter().filter(|u| **u == Some(5_000_000)).count(), 16);
        assert_eq!(ups.iter().filter(|u| **u == Some(20_000_000)).count(), 32);
        assert_eq!(plan.leechers()[2].up_bps, Some(5_000_000), "l003");
        assert_eq!(plan.seed().up_bps, Some(40_000_000));
        assert!(
            plan.hosts[..49]
                .iter()
                .all(|h| h.down_bps == Some(40_000_000))
        );
    }

    #[test]
    fn b5_plan_has_an_origin_per_package() {
        let plan = Plan::new(&Scenario::preset("b5").unwrap(), Tbf::for_leechers(24, 50));
        assert_eq!(plan.leechers().len(), 24);
        let origins: Vec<(&str, Ipv4Addr)> = plan
            .origins()
            .iter()
            .map(|h| (h.label.as_str(), h.ip))
            .collect();
        assert_eq!(
            origins,
            vec![
                ("o2", Ipv4Addr::new(198, 18, 0, 251)),
                ("o3", Ipv4Addr::new(198, 18, 0, 252)),
                ("o4", Ipv4Addr::new(198, 18, 0, 253)),
            ]
        );
        assert!(plan.origins().iter().all(|h| h.up_bps == Some(80_000_000)));
        assert_eq!(plan.tracker().label, "trk");
        assert!(
            Plan::new(&Scenario::preset("b1").unwrap(), Tbf::default())
                .origins()
                .is_empty()
        );
    }

    #[test]
    fn fleet_scenarios_get_a_bucket_that_holds_a_gso_packet() {
        assert_eq!(Tbf::for_leechers(8, 50), Tbf::default());
        let fleet = Tbf::for_leechers(48, 50);
        assert_eq!(fleet.burst_bytes, 128 << 10);
        assert!(fleet.burst_bytes >= 64 << 10, "a whole 64 KiB GSO packet");
        let plan = Plan::new(&Scenario::preset("b1-48").unwrap(), fleet);
        let cmds: Vec<String> = plan.setup_commands().iter().map(|c| joined(c)).collect();
        assert!(cmds.contains(
            &"tc -n fbsb-seed qdisc replace dev eth0 root tbf rate 20000000bit burst 131072 latency 50ms"
                .to_owned()
        ));
    }

    #[test]
    fn small_first_caps_at_the_same_rate_and_sends_small_packets_first() {
        let tbf = Tbf {
            queue: Queue::SmallFirst,
            ..Tbf::for_leechers(48, 50)
        };
        let cmds: Vec<String> = cap_commands("fbsb-l003", "eth0", 5_000_000, tbf)
            .iter()
            .map(|c| joined(c))
            .collect();
        let tc = "tc -n fbsb-l003";
        assert_eq!(
            cmds,
            [
                format!("{tc} qdisc replace dev eth0 root handle 1: htb default 20"),
                format!(
                    "{tc} class add dev eth0 parent 1: classid 1:1 htb rate 5000000bit \
                     ceil 5000000bit burst 131072 cburst 131072"
                ),
                format!(
                    "{tc} class add dev eth0 parent 1:1 classid 1:10 htb rate 500000bit \
                     ceil 5000000bit burst 131072 cburst 131072 prio 0 quantum 1514"
                ),
                format!(
                    "{tc} class add dev eth0 parent 1:1 classid 1:20 htb rate 4500000bit \
                     ceil 5000000bit burst 131072 cburst 131072 prio 1 quantum 1514"
                ),
                // 50 ms at 5 Mbit/s plus the bucket, as tc sizes the tbf's queue.
                format!("{tc} qdisc add dev eth0 parent 1:10 handle 10: bfifo limit 162322"),
                format!("{tc} qdisc add dev eth0 parent 1:20 handle 20: bfifo limit 162322"),
                format!(
                    "{tc} filter add dev eth0 parent 1: protocol ip prio 1 u32 \
                     match u16 0x0000 0xff80 at 2 flowid 1:10"
                ),
            ]
        );
        // The default class is the bulk one: whatever the filter does not match waits there.
        assert!(cmds[0].ends_with("default 20") && cmds[3].contains("classid 1:20"));
        // FIFO is the one tbf, as before.
        assert_eq!(
            cap_commands("fbsb-l003", "eth0", 5_000_000, Tbf::for_leechers(48, 50)),
            vec![tbf_command(
                "fbsb-l003",
                "eth0",
                5_000_000,
                Tbf::for_leechers(48, 50)
            )]
        );
    }

    #[test]
    fn setup_caps_both_directions_but_not_the_tracker() {
        let plan = Plan::new(&Scenario::preset("b2").unwrap(), Tbf::default());
        let cmds: Vec<String> = plan.setup_commands().iter().map(|c| joined(c)).collect();
        assert_eq!(cmds[0], "ip netns add fbsb-sw");
        assert!(
            cmds.contains(
                &"ip netns exec fbsb-sw sysctl -qew net.bridge.bridge-nf-call-iptables=0 \
              net.bridge.bridge-nf-call-ip6tables=0 net.bridge.bridge-nf-call-arptables=0"
                    .to_owned()
            )
        );
        assert!(cmds.contains(
            &"ip -n fbsb-sw link add s-l003 type veth peer name eth0 netns fbsb-l003".to_owned()
        ));
        assert!(cmds.contains(&"ip -n fbsb-l003 addr add 198.18.0.4/24 dev eth0".to_owned()));
        // Leecher upload (40) on the host side, download (160) on the switch side.
        assert!(cmds.contains(
            &"tc -n fbsb-l003 qdisc replace dev eth0 root tbf rate 40000000bit burst 32768 latency 50ms"
                .to_owned()
        ));
        assert!(cmds.contains(
            &"tc -n fbsb-sw qdisc replace dev s-l003 root tbf rate 160000000bit burst 32768 latency 50ms"
                .to_owned()
        ));
        assert!(cmds.contains(
            &"tc -n fbsb-seed qdisc replace dev eth0 root tbf rate 80000000bit burst 32768 latency 50ms"
                .to_owned()
        ));
        assert!(!cmds.iter().any(|c| c.starts_with("tc -n fbsb-trk")));
        assert!(!cmds.iter().any(|c| c.contains("s-trk root tbf")));
        // Every command names a namespace: nothing lands in the root namespace.
        for c in &cmds {
            assert!(
                c.starts_with("ip netns add fbsb-")
                    || c.starts_with("ip netns exec fbsb-")
                    || c.contains(" -n fbsb-"),
                "{c}"
            );
        }
        let down = plan.teardown_commands();
        assert_eq!(joined(down.last().unwrap()), "ip netns del fbsb-sw");
        assert_eq!(down.len(), plan.hosts.len() + 1);
    }

    #[test]
    fn recognises_leftovers() {
        assert_eq!(is_ours("fbsb-l001 (id: 3)"), Some("fbsb-l001"));
        assert_eq!(is_ours("fbsb-sw"), Some("fbsb-sw"));
        assert_eq!(is_ours("other-ns (id: 0)"), None);
        assert_eq!(is_ours(""), None);
    }

    #[test]
    fn a_48_host_mesh_needs_more_arp_entries_than_the_kernel_default() {
        let plan = Plan::new(&Scenario::preset("b1-48").unwrap(), Tbf::default());
        // Seed, 48 leechers, tracker: 50 hosts, each with 49 neighbours.
        assert_eq!(plan.neighbour_entries(), 50 * 49);
        assert!(plan.neighbour_entries() > 1024, "over gc_thresh3's default");
    }
}
