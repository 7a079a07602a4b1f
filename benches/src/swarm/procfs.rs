//! Parsers for the few /proc files the benchmark reads (text in, numbers out; no I/O here).

use std::collections::BTreeMap;

/// Kernel clock ticks per second (`USER_HZ`): 100 on every Linux architecture in use.
pub const TICKS_PER_SEC: f64 = 100.0;

/// What `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z` (exited, not yet reaped), ...
    pub state: char,
    /// User plus system ticks of all its threads (still counted while it is a zombie).
    pub cpu_ticks: u64,
    /// The system (kernel) part of `cpu_ticks`.
    pub sys_ticks: u64,
}

/// Parse `/proc/PID/stat`. The command name is in parentheses and may hold spaces or
/// parentheses itself, so fields are counted from the last `)`: state is field 3, utime 14 and
/// stime 15.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ProcStat {
        state,
        cpu_ticks: utime + stime,
        sys_ticks: stime,
    })
}

/// A `kB` field of `/proc/PID/status` (e.g. `VmHWM`, `VmRSS`), in bytes.
pub fn status_kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = v.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

/// Counters of one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DevBytes {
    /// Bytes received.
    pub rx: u64,
    /// Bytes transmitted.
    pub tx: u64,
    /// Packets transmitted (a GSO super-packet counts once on a veth).
    pub tx_packets: u64,
}

/// Parse `/proc/net/dev` (of some process's namespace): interface -> counters.
pub fn parse_net_dev(text: &str) -> BTreeMap<String, DevBytes> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            // rx: bytes packets errs drop fifo frame compressed multicast; then tx: bytes ...
            Some((
                name.trim().to_owned(),
                DevBytes {
                    rx: *v.first()?,
                    tx: *v.get(8)?,
                    tx_packets: *v.get(9)?,
                },
            ))
        })
        .collect()
}

/// Busy and total ticks of all CPUs from `/proc/stat` (busy = all but idle and iowait).
pub fn parse_machine_ticks(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    Some((total - v.get(3)? - v.get(4)?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_hostile_command_name() {
        let s = "4242 (fbpkg-rs (x) y) Z 1 4242 4242 0 -1 4194560 100 0 0 0 123 45 6 7 20 0 9 0";
        assert_eq!(
            parse_stat(s),
            Some(ProcStat {
                state: 'Z',
                cpu_ticks: 168,
                sys_ticks: 45,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tfbpkg-rs\nVmPeak:\t  100 kB\nVmHWM:\t   31000 kB\nVmRSS:\t 2000 kB\n";
        assert_eq!(status_kib_field(s, "VmHWM"), Some(31000 * 1024));
        assert_eq!(status_kib_field(s, "VmRSS"), Some(2000 * 1024));
        assert_eq!(status_kib_field(s, "VmSwap"), None);
    }

    #[test]
    fn net_dev() {
        let s = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
 lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n\
 s-seed: 1000      10    0    0    0     0          0         0   999999      70    0    0    0     0       0          0\n";
        let m = parse_net_dev(s);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m["s-seed"],
            DevBytes {
                rx: 1000,
                tx: 999_999,
                tx_packets: 70,
            }
        );
    }

    #[test]
    fn machine_ticks() {
        let s = "cpu  100 0 50 1000 10 1 2 0 0 0\ncpu0 1 2 3\n";
        assert_eq!(parse_machine_ticks(s), Some((153, 1163)));
    }
}
