//! A token bucket shared by all connections of an engine: caps the agent's upload so a
//! rollout cannot saturate a host's uplink.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The smallest burst: two of the largest block a peer may request (128 KiB), so any request
/// can be served at any rate — a bucket smaller than a block would never fill enough.
const MIN_BURST: f64 = (256 << 10) as f64;

/// Bytes per second with a one-second burst (at least [`MIN_BURST`]). `take` never blocks: it
/// says how long to wait.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (at least 16 KiB/s, one block).
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = (bytes_per_sec as f64).max(16384.0);
        let burst = rate.max(MIN_BURST);
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Take `n` bytes of budget, or learn how long until there is enough.
    pub fn take(&self, n: u64) -> Result<(), Duration> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last) = *st;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        let need = (n as f64).min(self.burst);
        if tokens >= need {
            *st = (tokens - need, now);
            Ok(())
        } else {
            *st = (tokens, now);
            Err(Duration::from_secs_f64((need - tokens) / self.rate))
        }
    }
}

impl RateLimiter {
    /// Take the budget of up to `max` units of `unit` bytes: how many it grants (at least one),
    /// or how long until one fits.
    pub fn take_units(&self, max: usize, unit: u64) -> Result<usize, Duration> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last) = *st;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        let unit_f = (unit as f64).clamp(1.0, self.burst);
        let n = ((tokens / unit_f).floor() as usize).min(max);
        if n == 0 {
            *st = (tokens, now);
            return Err(Duration::from_secs_f64((unit_f - tokens) / self.rate));
        }
        *st = (tokens - n as f64 * unit_f, now);
        Ok(n)
    }

    /// Give back budget taken and not used.
    pub fn give_back(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = (st.0 + bytes as f64).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn units_are_granted_as_the_budget_allows() {
        let l = RateLimiter::new(1 << 20);
        // A one-second burst of 1 MiB is 64 blocks of 16 KiB.
        assert_eq!(l.take_units(100, 16 << 10), Ok(64));
        let wait = l.take_units(100, 16 << 10).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0 / 64.0).abs() < 1e-3, "{wait:?}");
        l.give_back(3 * (16 << 10));
        assert_eq!(l.take_units(2, 16 << 10), Ok(2), "capped by max");
        assert_eq!(l.take_units(100, 16 << 10), Ok(1), "what was given back");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(l.take_units(100, 16 << 10), Ok(32), "half a second of rate");
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refills_at_the_rate() {
        let l = RateLimiter::new(1_000_000);
        assert!(l.take(1_000_000).is_ok(), "one second of burst");
        let wait = l.take(500_000).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 0.01, "{wait:?}");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.take(500_000).is_ok());
        assert!(l.take(1).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_block_larger_than_a_second_of_rate_is_served() {
        // 16 KiB/s and a 128 KiB request: the bucket must be able to hold a whole block.
        let l = RateLimiter::new(16 << 10);
        assert!(
            l.take(128 << 10).is_ok(),
            "the first block goes out of the burst"
        );
        assert!(l.take(128 << 10).is_ok(), "the bucket holds two");
        let wait = l.take(128 << 10).unwrap_err();
        assert!(wait <= Duration::from_secs(9), "{wait:?}");
        tokio::time::advance(wait + Duration::from_millis(1)).await;
        assert!(l.take(128 << 10).is_ok(), "and the next after its wait");
    }
}
