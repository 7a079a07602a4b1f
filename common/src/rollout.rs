//! The pure parts of a fleet rollout, shared by the tracker (which decides) and the agent and
//! CLI (which show): host ids, phases, failure budgets and the bucket a host falls in.
//!
//! # Buckets: who goes first
//!
//! A host's bucket for a tag is the first 8 bytes (big-endian) of
//! `SHA-256("<name>:<tag>:" || host id)` as a `u64`, modulo 10 000: a number of basis points in
//! `0..10_000`. A percentage phase of `p`% covers the hosts whose bucket is below `p * 100`.
//!
//! The bucket depends on the package name, the tag and the host id only, never on the versions
//! or on the rollout: **the same hosts go first in every rollout of the same tag** (a stable
//! canary set, so the hosts that took the last risk are the ones watched for the next), while
//! different tags (or packages) draw their canaries from different hosts, so one unlucky host
//! is not the canary of everything. Phases are cumulative: a host in the 10% phase stays on the
//! new version at 50% and 100%.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, clip};
use crate::pkgref::{PackageName, Tag};
use crate::tracker_proto::Zone;

/// Buckets per tag: basis points, so a phase can be as fine as 0.01% (percent phases use whole
/// percents today).
pub const BUCKETS: u16 = 10_000;

/// A host's stable bucket for `name:tag`, in `0..BUCKETS`. See the module doc.
pub fn bucket(name: &PackageName, tag: &Tag, host: &HostId) -> u16 {
    let mut h = Sha256::new();
    h.update(name.as_str().as_bytes());
    h.update(b":");
    h.update(tag.as_str().as_bytes());
    h.update(b":");
    h.update(host.as_str().as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // The remainder is below 10 000, so it fits.
    (u64::from_be_bytes(first) % u64::from(BUCKETS)) as u16
}

/// A host's identity as the agent keeps it in its state dir: opaque, 1 to 64 bytes of
/// `[A-Za-z0-9._-]`. Never trusted alone: the tracker pairs it with the address it comes from.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct HostId(String);

impl HostId {
    /// Most bytes in a host id.
    pub const MAX_LEN: usize = 64;

    /// Validate and wrap.
    pub fn new(s: &str) -> Result<Self, Error> {
        let bad = |why: &'static str| Error::InvalidName {
            what: "host id",
            value: clip(s),
            why,
        };
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(bad("must be 1 to 64 bytes"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
        }
        Ok(Self(s.to_owned()))
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> Deserialize<'de> for HostId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// One phase of a rollout: a zone (every host whose zone is that path or under it), or a
/// percentage of the fleet's buckets. Written `zone:dc1/rack7` or `10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Hosts in this zone or below it.
    Zone(Zone),
    /// Hosts whose bucket is below `percent * 100`.
    Percent(u8),
}

impl Phase {
    /// Does this phase's own set contain a host with `bucket` and `zone`?
    pub fn covers(&self, bucket: u16, zone: Option<&Zone>) -> bool {
        match self {
            Phase::Percent(p) => u32::from(bucket) < u32::from(*p) * 100,
            Phase::Zone(z) => zone.is_some_and(|hz| {
                hz.as_str() == z.as_str()
                    || hz
                        .as_str()
                        .strip_prefix(z.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            }),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Zone(z) => write!(f, "zone:{}", z.as_str()),
            Phase::Percent(p) => write!(f, "{p}"),
        }
    }
}

impl FromStr for Phase {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if let Some(z) = s.strip_prefix("zone:") {
            return Ok(Phase::Zone(Zone::new(z)?));
        }
        match s.trim_end_matches('%').parse::<u8>() {
            Ok(p @ 1..=100) => Ok(Phase::Percent(p)),
            _ => Err(Error::Query(format!(
                "invalid phase {:?}: a percentage 1 to 100 or zone:<path>",
                clip(s)
            ))),
        }
    }
}

impl Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Check a phase list: zone phases first, then percentages strictly ascending, ending at 100.
pub fn validate_phases(phases: &[Phase]) -> Result<(), Error> {
    let bad = |why: String| Err(Error::Query(format!("invalid phases: {why}")));
    if phases.is_empty() || phases.len() > 32 {
        return bad("give 1 to 32 phases".into());
    }
    let mut last: Option<u8> = None;
    for p in phases {
        match p {
            Phase::Zone(z) if last.is_some() => {
                return bad(format!(
                    "zone:{} comes after a percentage; zone phases go first",
                    z.as_str()
                ));
            }
            Phase::Zone(_) => {}
            Phase::Percent(v) => {
                if last.is_some_and(|l| *v <= l) {
                    return bad(format!("{v} does not ascend"));
                }
                last = Some(*v);
            }
        }
    }
    if last != Some(100) {
        return bad("the last phase must be 100".into());
    }
    Ok(())
}

/// The first phase (index) whose set contains the host, if any. Sets are cumulative: a host is
/// on the new version in phase `p` exactly when this is `<= p`.
pub fn first_phase(phases: &[Phase], bucket: u16, zone: Option<&Zone>) -> Option<usize> {
    phases.iter().position(|p| p.covers(bucket, zone))
}

/// How many unhealthy hosts a rollout tolerates before it halts: a count, or a percentage of
/// the hosts in the phases reached so far (rounded down, so `2%` of 10 hosts tolerates none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxFailures {
    /// At most this many.
    Count(u32),
    /// At most this percentage (0 to 100).
    Percent(u8),
}

impl MaxFailures {
    /// Failures tolerated among `hosts` hosts.
    pub fn allowed(self, hosts: usize) -> usize {
        match self {
            MaxFailures::Count(c) => c as usize,
            MaxFailures::Percent(p) => hosts * usize::from(p) / 100,
        }
    }
}

impl fmt::Display for MaxFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxFailures::Count(c) => write!(f, "{c}"),
            MaxFailures::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for MaxFailures {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::Query(format!(
                "invalid max_failures {:?}: a count (\"2\") or a percentage 0 to 100 (\"2%\")",
                clip(s)
            ))
        };
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(v @ 0..=100) => Ok(MaxFailures::Percent(v)),
                _ => Err(bad()),
            },
            None => s.parse().map(MaxFailures::Count).map_err(|_| bad()),
        }
    }
}

impl Serialize for MaxFailures {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MaxFailures {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> PackageName {
        PackageName::new(s).unwrap()
    }
    fn t(s: &str) -> Tag {
        Tag::new(s).unwrap()
    }

    #[test]
    fn bucket_is_pinned() {
        // Pinned: agents, dashboards and the README depend on this exact function.
        // sha256("myapp:prod:host-1")[..8] as a big-endian u64, mod 10 000 (checked with
        // Python's hashlib).
        let b = bucket(&n("myapp"), &t("prod"), &HostId::new("host-1").unwrap());
        assert_eq!(b, 4821);
    }

    #[test]
    fn buckets_are_roughly_uniform_and_differ_between_tags() {
        let (name, prod, canary) = (n("myapp"), t("prod"), t("canary"));
        let mut tenths = [0u32; 10];
        let mut same = 0;
        for i in 0..10_000 {
            let h = HostId::new(&format!("host-{i}")).unwrap();
            let b = bucket(&name, &prod, &h);
            assert!(b < BUCKETS);
            tenths[usize::from(b / 1000)] += 1;
            if (b < 1000) && (bucket(&name, &canary, &h) < 1000) {
                same += 1;
            }
        }
        // 1 000 expected per tenth; the standard deviation is 30, so 850..1150 is 5 sigma.
        for c in tenths {
            assert!((850..1150).contains(&c), "{tenths:?}");
        }
        // Independent tags: ~10% of the 10% canaries of one are canaries of the other.
        assert!(same < 200, "{same} hosts are canaries of both tags");
    }

    #[test]
    fn phases_parse_and_validate() {
        let p = |v: &[&str]| -> Result<Vec<Phase>, Error> {
            let ps = v.iter().map(|s| s.parse()).collect::<Result<Vec<_>, _>>()?;
            validate_phases(&ps).map(|()| ps)
        };
        let ok = p(&["zone:dc1/rack7", "10", "50", "100"]).unwrap();
        assert_eq!(ok[0].to_string(), "zone:dc1/rack7");
        assert!(p(&["100"]).is_ok());
        assert!(p(&["10", "5", "100"]).is_err());
        assert!(p(&["10", "10", "100"]).is_err());
        assert!(p(&["10", "50"]).is_err());
        assert!(p(&["10", "zone:dc1", "100"]).is_err());
        assert!(p(&["0", "100"]).is_err());
        assert!(p(&["101"]).is_err());
        assert!(p(&[]).is_err());
        let z: Phase = "zone:dc1/rack7".parse().unwrap();
        let zone = |s: &str| Zone::new(s).unwrap();
        assert!(z.covers(9999, Some(&zone("dc1/rack7"))));
        assert!(z.covers(9999, Some(&zone("dc1/rack7/h3"))));
        assert!(!z.covers(0, Some(&zone("dc1/rack70"))));
        assert!(!z.covers(0, None));
        assert!(Phase::Percent(10).covers(999, None));
        assert!(!Phase::Percent(10).covers(1000, None));
    }

    #[test]
    fn max_failures_parse() {
        assert_eq!("2".parse::<MaxFailures>().unwrap(), MaxFailures::Count(2));
        assert_eq!(
            "2%".parse::<MaxFailures>().unwrap(),
            MaxFailures::Percent(2)
        );
        assert!("101%".parse::<MaxFailures>().is_err());
        assert!("-1".parse::<MaxFailures>().is_err());
        assert!("x".parse::<MaxFailures>().is_err());
        assert_eq!(MaxFailures::Percent(2).allowed(10), 0);
        assert_eq!(MaxFailures::Percent(10).allowed(25), 2);
        assert!(HostId::new("a.b_c-D9").is_ok());
        assert!(HostId::new("a/b").is_err());
        assert!(HostId::new(&"x".repeat(65)).is_err());
    }

    proptest! {
        #[test]
        fn bucket_is_stable_and_in_range(id in "[A-Za-z0-9._-]{1,64}") {
            let h = HostId::new(&id).unwrap();
            let a = bucket(&n("app"), &t("prod"), &h);
            prop_assert!(a < BUCKETS);
            prop_assert_eq!(a, bucket(&n("app"), &t("prod"), &h.clone()));
        }

        #[test]
        fn phase_round_trips(p in 1u8..=100) {
            let ph = Phase::Percent(p);
            prop_assert_eq!(ph.to_string().parse::<Phase>().unwrap(), ph);
        }
    }
}
