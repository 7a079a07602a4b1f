//! Scenarios of the flash-crowd benchmark and their physical limit (Kumar-Ross).

use std::time::Duration;

use serde::Serialize;

/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;

/// Link caps of a scenario, in bit/s (SI: 1 Mbit/s = 10^6 bit/s, as `tc` counts them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Caps {
    /// The seed host's upload.
    pub seed_up_bps: u64,
    /// Every leecher host's upload.
    pub leecher_up_bps: u64,
    /// Every leecher host's download (the seed's download is capped the same way).
    pub leecher_down_bps: u64,
}

/// One flash crowd: N leechers ask one seed for an F-byte package at the same instant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    /// `b1`, `b2`, `smoke`, ...
    pub name: String,
    /// Leecher hosts (N).
    pub leechers: usize,
    /// Package bytes (F).
    pub package_bytes: u64,
    /// Link caps.
    pub caps: Caps,
    /// Packages (B5: 4), each F bytes from its own origin host (the seed holds the first),
    /// all asked for at once by every leecher.
    pub packages: usize,
    /// Leechers whose uplink is thinner than `caps.leecher_up_bps` (B3), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_uplinks: Option<SlowUplinks>,
    /// Leechers whose downlink is thinner than `caps.leecher_down_bps` (stragglers), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stragglers: Option<Stragglers>,
    /// Hosts killed and restarted during the crowd, and hosts that join late (B4), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<Churn>,
    /// What [`Scenario::scale_rates`] multiplied the preset's caps by (`--rate-scale`; 1 for
    /// the caps BENCHMARKS.md gives). `caps` hold the scaled rates; this says they are scaled.
    pub rate_scale: f64,
}

/// B4: hosts die and come back during a push, and others join late. The last `joiners` of
/// the N leechers start at T_KR / 2; of the others, one in `killed_one_in` (spread evenly) is
/// killed with SIGKILL, agent and client, at half its progress, and started again on the same
/// disk `restart_after_secs` later.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Churn {
    /// One leecher in this many (of those there at the start) is killed.
    pub killed_one_in: usize,
    /// Leechers that join at T_KR / 2 (the last ones).
    pub joiners: usize,
    /// Seconds between a kill and the restart.
    pub restart_after_secs: f64,
}

/// Some leechers download slower than the rest: hosts that would hold a crowd back if it
/// waited for them. Spread like [`SlowUplinks`]: N / `one_in` of the leechers, evenly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stragglers {
    /// One leecher in this many is a straggler.
    pub one_in: usize,
    /// Their download cap, bit/s.
    pub down_bps: u64,
}

/// Some leechers' uplinks are thinner than the rest: the fleet's thin racks.
///
/// N / `one_in` of the leechers are slow, spread evenly (every third one when a third are
/// slow), not bunched at the end, so they are not also the last to announce; with
/// `--leechers` the share stays the same.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SlowUplinks {
    /// One leecher in this many is slow.
    pub one_in: usize,
    /// Their upload cap, bit/s.
    pub up_bps: u64,
}

/// The three terms of the Kumar-Ross bound, in seconds; the bound is the largest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KumarRoss {
    /// F / u_s: the seed must upload every byte once.
    pub seed_secs: f64,
    /// F / d: every leecher must download every byte.
    pub download_secs: f64,
    /// N F / (u_s + N u): N copies through all the upload there is.
    pub aggregate_secs: f64,
    /// T_KR = the largest of the three.
    pub t_kr_secs: f64,
}

const fn mbit(n: u64) -> u64 {
    n * 1_000_000
}

/// The share of the `delta` scenario's bytes that version N+1 changes.
pub const DELTA_CHANGED_SHARE: f64 = 0.05;

impl Scenario {
    /// A scenario of BENCHMARKS.md by name: `b1` (seed-bound), `b2` (upload-bound), `b1-48`
    /// (a fleet-scale flash crowd: 48 leechers, 64 MiB, 20/20/40 Mbit/s), `smoke` (B1's caps,
    /// 4 leechers, 32 MiB: a run of all contenders in about a minute) or `rollout` (issue 9's
    /// bench: 16 hosts following a tag, B1's caps, 64 MiB, so one distribution takes about 7 s:
    /// a flash crowd of the new version, then a phased rollout to it with prefetch on and
    /// off; see [`Scenario::is_rollout`]). Issue 12's: `b3` (48 leechers, a third of them on
    /// thin uplinks), `b5` (4 packages from 4 origins) and `stragglers` (B1 with two of the
    /// eight leechers at a quarter of the download rate). Issue 13's: `delta` (16 hosts, B1's
    /// caps, a 512 MiB directory package; see [`Scenario::is_delta`]).
    pub fn preset(name: &str) -> Option<Self> {
        let b1 = Caps {
            seed_up_bps: mbit(80),
            leecher_up_bps: mbit(80),
            leecher_down_bps: mbit(160),
        };
        let (leechers, package_bytes, caps) = match name {
            "b1" => (8, 256 * MIB, b1),
            "b2" => (
                8,
                256 * MIB,
                Caps {
                    leecher_up_bps: mbit(40),
                    ..b1
                },
            ),
            "b1-48" => (
                48,
                64 * MIB,
                Caps {
                    seed_up_bps: mbit(20),
                    leecher_up_bps: mbit(20),
                    leecher_down_bps: mbit(40),
                },
            ),
            "b3" => {
                return Some(Self {
                    name: name.to_owned(),
                    leechers: 48,
                    package_bytes: 64 * MIB,
                    caps: Caps {
                        seed_up_bps: mbit(40),
                        leecher_up_bps: mbit(20),
                        leecher_down_bps: mbit(40),
                    },
                    packages: 1,
                    slow_uplinks: Some(SlowUplinks {
                        one_in: 3,
                        up_bps: mbit(5),
                    }),
                    stragglers: None,
                    churn: None,
                    rate_scale: 1.0,
                });
            }
            "b5" => {
                return Some(Self {
                    name: name.to_owned(),
                    leechers: 24,
                    package_bytes: 64 * MIB,
                    caps: b1,
                    packages: 4,
                    slow_uplinks: None,
                    stragglers: None,
                    churn: None,
                    rate_scale: 1.0,
                });
            }
            "b4" => {
                return Some(Self {
                    name: name.to_owned(),
                    leechers: 36,
                    package_bytes: 128 * MIB,
                    caps: b1,
                    packages: 1,
                    slow_uplinks: None,
                    stragglers: None,
                    churn: Some(Churn {
                        killed_one_in: 4,
                        joiners: 4,
                        restart_after_secs: 5.0,
                    }),
                    rate_scale: 1.0,
                });
            }
            "stragglers" => {
                return Some(Self {
                    name: name.to_owned(),
                    leechers: 8,
                    package_bytes: 256 * MIB,
                    caps: b1,
                    packages: 1,
                    slow_uplinks: None,
                    stragglers: Some(Stragglers {
                        one_in: 4,
                        down_bps: mbit(40),
                    }),
                    churn: None,
                    rate_scale: 1.0,
                });
            }
            "smoke" => (4, 32 * MIB, b1),
            "rollout" => (16, 64 * MIB, b1),
            "delta" => (16, 512 * MIB, b1),
            _ => return None,
        };
        Some(Self {
            name: name.to_owned(),
            leechers,
            package_bytes,
            caps,
            packages: 1,
            slow_uplinks: None,
            stragglers: None,
            churn: None,
            rate_scale: 1.0,
        })
    }

    /// Whether leecher `i` (1 to N) has a slow uplink.
    pub fn is_slow(&self, i: usize) -> bool {
        self.slow_uplinks
            .is_some_and(|s| one_in(i, self.leechers, s.one_in))
    }

    /// Whether leecher `i` (1 to N) is a straggler (a slow downlink).
    pub fn is_straggler(&self, i: usize) -> bool {
        self.stragglers
            .is_some_and(|s| one_in(i, self.leechers, s.one_in))
    }

    /// Whether leecher `i` (1 to N) joins late (B4's last hosts).
    pub fn is_joiner(&self, i: usize) -> bool {
        self.churn
            .is_some_and(|c| i <= self.leechers && i + c.joiners > self.leechers)
    }

    /// Whether leecher `i` (1 to N) is killed at half its progress and restarted (B4).
    pub fn is_killed(&self, i: usize) -> bool {
        self.churn.is_some_and(|c| {
            let first = self.leechers.saturating_sub(c.joiners);
            one_in(i, first, c.killed_one_in)
        })
    }

    /// Download cap of leecher `i` (1 to N), bit/s.
    pub fn leecher_down_bps(&self, i: usize) -> u64 {
        match self.stragglers {
            Some(s) if self.is_straggler(i) => s.down_bps,
            _ => self.caps.leecher_down_bps,
        }
    }

    /// Leecher `i`'s own bound: T_KR, or the time its own downlink takes if that is longer
    /// (`max(T_KR, P F / d_i)`; T_KR counts the other hosts' downlinks).
    pub fn own_bound_secs(&self, i: usize) -> f64 {
        let bits = self.package_bytes as f64 * 8.0 * self.packages.max(1) as f64;
        let own = bits / self.leecher_down_bps(i) as f64;
        self.kumar_ross().t_kr_secs.max(own)
    }

    /// Upload cap of leecher `i` (1 to N), bit/s.
    pub fn leecher_up_bps(&self, i: usize) -> u64 {
        match self.slow_uplinks {
            Some(s) if self.is_slow(i) => s.up_bps,
            _ => self.caps.leecher_up_bps,
        }
    }

    /// The sum of every leecher's upload cap, bit/s.
    pub fn leechers_up_sum_bps(&self) -> u64 {
        (1..=self.leechers).map(|i| self.leecher_up_bps(i)).sum()
    }

    /// The `rollout` scenario: besides the flash crowd of every contender, the leechers follow
    /// a tag and a new version is rolled out to them in four equal phases
    /// ([`super::rollout`]).
    pub fn is_rollout(&self) -> bool {
        self.name == "rollout"
    }

    /// The `delta` scenario (issue 13): the package is a directory (a tree package) of F
    /// bytes, version N+1 of a version N that changes [`DELTA_CHANGED_SHARE`] of its bytes.
    /// The contenders' flash crowds distribute N+1 to hosts holding nothing; then fbpkg-rs's
    /// hosts fetch N first (not timed) and N+1 from there.
    pub fn is_delta(&self) -> bool {
        self.name == "delta"
    }

    /// `T_KR = max(F/u_s, F/d, N F/(u_s + sum u_i))`, F in bits (with equal uplinks the
    /// sum is N u). d is the hosts' common downlink: stragglers have their own bound
    /// ([`Scenario::own_bound_secs`]). With P packages from P origins of u_s each, for the total bytes:
    /// `max(F/u_s, P F/d, N P F/(P u_s + sum u_i))`.
    pub fn kumar_ross(&self) -> KumarRoss {
        let bits = self.package_bytes as f64 * 8.0;
        let p = self.packages.max(1) as f64;
        let n = self.leechers as f64;
        let c = &self.caps;
        let seed_secs = bits / c.seed_up_bps as f64;
        let download_secs = p * bits / c.leecher_down_bps as f64;
        let aggregate_secs =
            n * p * bits / (p * c.seed_up_bps as f64 + self.leechers_up_sum_bps() as f64);
        KumarRoss {
            seed_secs,
            download_secs,
            aggregate_secs,
            t_kr_secs: seed_secs.max(download_secs).max(aggregate_secs),
        }
    }

    /// How long a contender may take before its unfinished leechers count as timed out:
    /// `factor` times T_KR, but never less than `floor`.
    pub fn deadline(&self, factor: f64, floor: Duration) -> Duration {
        Duration::from_secs_f64(self.kumar_ross().t_kr_secs * factor).max(floor)
    }

    /// Multiply every link cap by `factor`: the seed's and the leechers' caps, B3's thin
    /// uplinks and the stragglers' downlinks alike, so the Kumar-Ross bound scales by
    /// 1 / `factor` and a swarm that the links alone limit keeps its eta. On a machine with
    /// few cores, a run at 0.5 or 0.25 shows whether the CPU or the swarm sets the time.
    pub fn scale_rates(&mut self, factor: f64) {
        let scale = |bps: u64| (bps as f64 * factor).round() as u64;
        self.caps.seed_up_bps = scale(self.caps.seed_up_bps);
        self.caps.leecher_up_bps = scale(self.caps.leecher_up_bps);
        self.caps.leecher_down_bps = scale(self.caps.leecher_down_bps);
        if let Some(s) = self.slow_uplinks.as_mut() {
            s.up_bps = scale(s.up_bps);
        }
        if let Some(s) = self.stragglers.as_mut() {
            s.down_bps = scale(s.down_bps);
        }
        self.rate_scale *= factor;
    }

    /// Check the numbers make a runnable scenario on a /24.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_LEECHERS).contains(&self.leechers) {
            return Err(format!(
                "{}: N must be 1 to {MAX_LEECHERS} (one /24 holds the hosts)",
                self.name
            ));
        }
        let phases = super::rollout::PHASES.len();
        if self.is_rollout() && !self.leechers.is_multiple_of(phases) {
            return Err(format!(
                "{}: N must be a multiple of {phases}, so every phase adds as many hosts",
                self.name
            ));
        }
        if !(1..=MAX_PACKAGES).contains(&self.packages) {
            return Err(format!(
                "{}: 1 to {MAX_PACKAGES} packages (one origin host each)",
                self.name
            ));
        }
        if let Some(c) = self.churn
            && c.joiners >= self.leechers
        {
            return Err(format!(
                "{}: {} joiners leave no leecher at the start",
                self.name, c.joiners
            ));
        }
        if self.package_bytes == 0 {
            return Err(format!("{}: the package cannot be empty", self.name));
        }
        let c = &self.caps;
        let slow = self.slow_uplinks.map_or(c.leecher_up_bps, |s| s.up_bps);
        let straggling = self.stragglers.map_or(c.leecher_down_bps, |s| s.down_bps);
        if [
            c.seed_up_bps,
            c.leecher_up_bps,
            c.leecher_down_bps,
            slow,
            straggling,
        ]
        .iter()
        .any(|&r| r < 100_000)
        {
            return Err(format!(
                "{}: every cap must be at least 0.1 Mbit/s",
                self.name
            ));
        }
        Ok(())
    }
}

/// Whether leecher `i` (1 to `n`) is one of the `n / one_in` spread evenly among them: the
/// running share, `i * k / n` rounded down, steps up at i (every third host when a third are
/// chosen, not bunched at the end, so they are not also the last to announce).
fn one_in(i: usize, n: usize, one_in: usize) -> bool {
    if !(1..=n).contains(&i) {
        return false;
    }
    let k = n / one_in.max(1);
    i * k / n > (i - 1) * k / n
}

/// Most leecher hosts: 198.18.0.2 up to .250 (.1 is the seed, .251 to .253 the other
/// origins, .254 the tracker).
pub const MAX_LEECHERS: usize = 249;
/// Most packages (origins) in one scenario.
pub const MAX_PACKAGES: usize = 4;

/// Parse a rate like `80` (Mbit/s), `80M`, `1.5G`, `500k` into bit/s.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("bit").trim_end_matches("bps");
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1e3),
        Some((i, 'm' | 'M')) => (&t[..i], 1e6),
        Some((i, 'g' | 'G')) => (&t[..i], 1e9),
        _ => (t, 1e6),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a rate like 80 (Mbit/s), 80M or 1.5G"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok((v * mult).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 0.05
    }

    #[test]
    fn scaling_the_rates_scales_the_bound_and_keeps_the_shape() {
        for name in ["b1", "b3", "b5", "stragglers"] {
            let full = Scenario::preset(name).unwrap();
            let mut half = full.clone();
            half.scale_rates(0.5);
            let (kr, kr_half) = (full.kumar_ross(), half.kumar_ross());
            assert!(
                (kr_half.t_kr_secs - 2.0 * kr.t_kr_secs).abs() < 1e-6,
                "{name}: {kr:?} {kr_half:?}"
            );
            assert_eq!(half.caps.leecher_up_bps * 2, full.caps.leecher_up_bps);
            assert_eq!(half.caps.seed_up_bps * 2, full.caps.seed_up_bps);
            assert_eq!(half.caps.leecher_down_bps * 2, full.caps.leecher_down_bps);
            assert_eq!(half.leechers, full.leechers);
            assert_eq!((full.rate_scale, half.rate_scale), (1.0, 0.5), "recorded");
            assert_eq!(half.package_bytes, full.package_bytes);
        }
        let mut b3 = Scenario::preset("b3").unwrap();
        b3.scale_rates(0.25);
        assert_eq!(b3.slow_uplinks.unwrap().up_bps, 1_250_000);
        let mut s = Scenario::preset("stragglers").unwrap();
        s.scale_rates(0.5);
        assert_eq!(s.stragglers.unwrap().down_bps, 20_000_000);
        // Too slow to run: validate says so rather than shaping links to nothing.
        let mut tiny = Scenario::preset("b1").unwrap();
        tiny.scale_rates(0.001);
        assert!(tiny.validate().is_err());
    }

    #[test]
    fn benchmarks_md_bounds() {
        // BENCHMARKS.md: B1 26.8 s (seed-bound), B2 42.9 s (upload-bound).
        let b1 = Scenario::preset("b1").unwrap().kumar_ross();
        assert!(close(b1.t_kr_secs, 26.8), "{b1:?}");
        assert_eq!(b1.t_kr_secs, b1.seed_secs);
        let b2 = Scenario::preset("b2").unwrap().kumar_ross();
        assert!(close(b2.t_kr_secs, 42.9), "{b2:?}");
        assert_eq!(b2.t_kr_secs, b2.aggregate_secs);
        let smoke = Scenario::preset("smoke").unwrap().kumar_ross();
        assert!(close(smoke.t_kr_secs, 3.36), "{smoke:?}");
        // BENCHMARKS.md "Swarm at fleet scale": b1-48 is seed-bound at 26.8 s too.
        let b48 = Scenario::preset("b1-48").unwrap();
        assert_eq!(b48.leechers, 48);
        assert!(close(b48.kumar_ross().t_kr_secs, 26.8), "{b48:?}");
        assert!(Scenario::preset("b6").is_none());
        // The rollout scenario: B1's caps, 16 hosts, 64 MiB, seed-bound at 6.7 s.
        let r = Scenario::preset("rollout").unwrap();
        assert!(r.is_rollout() && !b48.is_rollout());
        assert!(close(r.kumar_ross().t_kr_secs, 6.71), "{r:?}");
        // BENCHMARKS.md "Swarm at fleet scale": delta, 16 hosts, a 512 MiB directory, B1's
        // caps; a full fetch is seed-bound at 53.7 s.
        let d = Scenario::preset("delta").unwrap();
        assert!(d.is_delta() && !r.is_delta());
        assert_eq!((d.leechers, d.package_bytes), (16, 512 * MIB));
        assert_eq!(d.caps, Scenario::preset("b1").unwrap().caps);
        assert!(close(d.kumar_ross().t_kr_secs, 53.69), "{d:?}");
    }

    #[test]
    fn b3_is_bound_by_the_sum_of_the_real_uplinks() {
        // BENCHMARKS.md "Swarm at fleet scale": 48 leechers, 64 MiB, seed up 40, 16 hosts at
        // 5 and 32 at 20 Mbit/s up, 40 down: N F / (40 + 16 * 5 + 32 * 20) = 33.9 s.
        let b3 = Scenario::preset("b3").unwrap();
        assert!(b3.validate().is_ok());
        assert_eq!((1..=48).filter(|&i| b3.is_slow(i)).count(), 16);
        assert!(b3.is_slow(3) && b3.is_slow(48) && !b3.is_slow(1) && !b3.is_slow(2));
        assert_eq!(b3.leecher_up_bps(3), mbit(5));
        assert_eq!(b3.leecher_up_bps(4), mbit(20));
        assert_eq!(b3.leechers_up_sum_bps(), mbit(720));
        let kr = b3.kumar_ross();
        assert_eq!(kr.t_kr_secs, kr.aggregate_secs);
        assert!(close(kr.t_kr_secs, 33.9), "{kr:?}");
        // With fewer leechers (--leechers), still a third of them slow, spread out.
        let mut small = b3.clone();
        small.leechers = 6;
        let slow: Vec<usize> = (1..=6).filter(|&i| small.is_slow(i)).collect();
        assert_eq!(slow, vec![3, 6]);
        small.leechers = 2;
        assert!(!small.is_slow(1) && !small.is_slow(2));
    }

    #[test]
    fn b4_kills_a_quarter_of_the_first_hosts_and_adds_four_late() {
        // BENCHMARKS.md: 32 leechers (+4), 128 MiB, B1's rates: seed-bound at F / u_s = 13.4 s
        // (36 hosts through every uplink: 13.1 s).
        let s = Scenario::preset("b4").unwrap();
        assert!(s.validate().is_ok());
        assert_eq!(s.leechers, 36);
        let killed: Vec<usize> = (1..=36).filter(|&i| s.is_killed(i)).collect();
        assert_eq!(killed, vec![4, 8, 12, 16, 20, 24, 28, 32]);
        let joiners: Vec<usize> = (1..=36).filter(|&i| s.is_joiner(i)).collect();
        assert_eq!(joiners, vec![33, 34, 35, 36]);
        assert!(
            close(s.kumar_ross().t_kr_secs, 13.4),
            "{:?}",
            s.kumar_ross()
        );
        let b1 = Scenario::preset("b1").unwrap();
        assert!(!(1..=8).any(|i| b1.is_killed(i) || b1.is_joiner(i)));
        let mut bad = s.clone();
        bad.leechers = 4;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn stragglers_have_their_own_bound_and_leave_the_crowds_alone() {
        // BENCHMARKS.md: B1 with two of the eight leechers at 40 Mbit/s down. The others keep
        // B1's bound (26.8 s); a straggler's own is F / 40 Mbit/s = 53.7 s.
        let s = Scenario::preset("stragglers").unwrap();
        assert!(s.validate().is_ok());
        let stragglers: Vec<usize> = (1..=8).filter(|&i| s.is_straggler(i)).collect();
        assert_eq!(stragglers, vec![4, 8]);
        assert!(!s.is_slow(4), "their uplinks are B1's");
        assert_eq!(s.leecher_down_bps(4), mbit(40));
        assert_eq!(s.leecher_down_bps(3), mbit(160));
        assert!(close(s.kumar_ross().t_kr_secs, 26.8));
        assert!(close(s.own_bound_secs(3), 26.8));
        assert!(close(s.own_bound_secs(8), 53.7), "{}", s.own_bound_secs(8));
        assert!(Scenario::preset("b1").unwrap().stragglers.is_none());
    }

    #[test]
    fn b5_is_bound_for_the_total_bytes() {
        // 24 leechers fetch 4 x 64 MiB from 4 origins of 80 Mbit/s each, B1's leecher caps:
        // N P F / (P u_s + N u) = 24 * 4 * 536.9 Mbit / (320 + 1920) = 23.0 s.
        let b5 = Scenario::preset("b5").unwrap();
        assert!(b5.validate().is_ok());
        let kr = b5.kumar_ross();
        assert_eq!(kr.t_kr_secs, kr.aggregate_secs);
        assert!(close(kr.t_kr_secs, 23.0), "{kr:?}");
        assert!(close(kr.download_secs, 13.4), "{kr:?}");
        assert!(close(kr.seed_secs, 6.7), "{kr:?}");
        let mut bad = b5.clone();
        bad.packages = 5;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn download_bound_when_the_leecher_link_is_thin() {
        let s = Scenario {
            name: "thin".into(),
            leechers: 2,
            package_bytes: 10 * MIB,
            caps: Caps {
                seed_up_bps: mbit(1000),
                leecher_up_bps: mbit(1000),
                leecher_down_bps: mbit(10),
            },
            packages: 1,
            slow_uplinks: None,
            stragglers: None,
            churn: None,
            rate_scale: 1.0,
        };
        let kr = s.kumar_ross();
        assert_eq!(kr.t_kr_secs, kr.download_secs);
        assert!(close(kr.t_kr_secs, 10.0 * 1_048_576.0 * 8.0 / 1e7));
    }

    #[test]
    fn deadline_has_a_floor() {
        let s = Scenario::preset("smoke").unwrap();
        assert_eq!(
            s.deadline(10.0, Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        let b1 = Scenario::preset("b1").unwrap();
        let d = b1.deadline(10.0, Duration::from_secs(60)).as_secs_f64();
        assert!(close(d, 268.4), "{d}");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("80"), Ok(80_000_000));
        assert_eq!(parse_rate("80M"), Ok(80_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("500kbit"), Ok(500_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn validation() {
        let mut s = Scenario::preset("b1").unwrap();
        assert!(s.validate().is_ok());
        s.leechers = 0;
        assert!(s.validate().is_err());
        s.leechers = 300;
        assert!(s.validate().is_err());
        let mut r = Scenario::preset("rollout").unwrap();
        assert!(r.validate().is_ok());
        r.leechers = 18;
        assert!(r.validate().is_err(), "four phases of equal size");
    }
}
