//! The flash-crowd benchmark (BENCHMARKS.md, "Swarm: a fleet flash crowd against the physical
//! limit"): the parts of `swarm_bench` that are pure and tested here — scenarios and the
//! Kumar-Ross bound ([`scenario`]), the network and the `ip`/`tc` commands that build it
//! ([`netplan`]), /proc parsers ([`procfs`]), wire-counter timelines and stalls
//! ([`timeline`]), warnings in logs ([`logscan`]), the figures and tables ([`report`]), and
//! the phases of the rollout scenario ([`rollout`]).
//!
//! ```
//! use fbpkg_benches::swarm::netplan::{Plan, Tbf};
//! use fbpkg_benches::swarm::scenario::Scenario;
//!
//! let b1 = Scenario::preset("b1").expect("a BENCHMARKS.md scenario");
//! assert!((b1.kumar_ross().t_kr_secs - 26.8).abs() < 0.05);
//! let plan = Plan::new(&b1, Tbf::default());
//! assert_eq!(plan.leechers().len(), 8);
//! ```

pub mod logscan;
pub mod netplan;
pub mod procfs;
pub mod report;
pub mod rollout;
pub mod scenario;
pub mod timeline;
