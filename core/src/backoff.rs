//! Reconnect delays: exponential backoff with jitter, pure (the caller supplies randomness).

use std::time::Duration;

/// Exponential backoff between `min` and `max`, with up to 25% jitter subtracted.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `min` and capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; `random` is any random number.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let exp = self.min.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let d = exp.min(self.max);
        let jitter = d.mul_f64((random % 1000) as f64 / 4000.0);
        d - jitter
    }

    /// Call after a success: the next failure starts again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(10))
    }
}

/// A cheap random number for jitter (not for anything secret).
pub fn jitter_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn grows_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_delay(0), Duration::from_millis(100));
        assert_eq!(b.next_delay(0), Duration::from_millis(200));
        assert_eq!(b.next_delay(0), Duration::from_millis(400));
        assert_eq!(b.next_delay(0), Duration::from_millis(800));
        assert_eq!(b.next_delay(0), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next_delay(0), Duration::from_millis(100));
    }

    proptest! {
        #[test]
        fn always_within_bounds(seeds in proptest::collection::vec(any::<u64>(), 1..80)) {
            let (min, max) = (Duration::from_millis(50), Duration::from_secs(5));
            let mut b = Backoff::new(min, max);
            for s in seeds {
                let d = b.next_delay(s);
                prop_assert!(d <= max && d >= min.mul_f64(0.75));
            }
        }
    }
}
