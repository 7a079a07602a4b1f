//! Latency percentiles from raw samples (a run holds at most a few hundred thousand).

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of latencies, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: usize,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Slowest.
    pub max_us: f64,
}

impl LatencySummary {
    /// Summarise `samples` (sorted in place). `None` when there are none.
    pub fn of(samples: &mut [Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let us = |d: Duration| d.as_nanos() as f64 / 1e3;
        // Nearest rank: the smallest sample with at least `per_mille`/1000 of all samples at or
        // below it (integer arithmetic, so p99.9 of 1000 samples is exactly the 999th).
        let rank = |per_mille: usize| {
            let n = samples.len();
            let i = (per_mille * n).div_ceil(1000).clamp(1, n) - 1;
            us(samples[i])
        };
        let total: Duration = samples.iter().sum();
        Some(Self {
            count: samples.len(),
            mean_us: us(total) / samples.len() as f64,
            p50_us: rank(500),
            p90_us: rank(900),
            p99_us: rank(990),
            p999_us: rank(999),
            max_us: samples.last().map_or(0.0, |d| us(*d)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(LatencySummary::of(&mut []), None);
        let mut v: Vec<Duration> = (1..=1000).rev().map(Duration::from_micros).collect();
        let s = LatencySummary::of(&mut v).unwrap();
        assert_eq!(s.count, 1000);
        assert_eq!(
            (s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us),
            (500.0, 900.0, 990.0, 999.0, 1000.0)
        );
        assert!((s.mean_us - 500.5).abs() < 1e-9);
        let one = LatencySummary::of(&mut [Duration::from_micros(7)]).unwrap();
        assert_eq!((one.p50_us, one.p99_us), (7.0, 7.0));
    }
}
