//! A token bucket with injected time: the one rate limiter behind the relay's control-message
//! limits, the connector's answers to refused packets and the direct-path probe budgets. Pure.

use std::time::{Duration, Instant};

/// A rate: `per_sec` tokens a second, at most `burst` banked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens per second.
    pub per_sec: f64,
    /// Bucket size.
    pub burst: f64,
}

impl Rate {
    /// `n` a second, bursts of up to `n`.
    pub fn per_sec(n: u32) -> Self {
        Self {
            per_sec: f64::from(n),
            burst: f64::from(n),
        }
    }
}

/// A token bucket. It starts full, whatever the rate it is used with.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    /// When `tokens` was last brought up to date; `None`: never used (full).
    at: Option<Instant>,
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self::full()
    }
}

impl TokenBucket {
    /// A full bucket.
    pub const fn full() -> Self {
        Self {
            tokens: f64::MAX,
            at: None,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = self
            .at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.tokens = (self.tokens.min(rate.burst) + dt * rate.per_sec).min(rate.burst);
        self.at = Some(now);
    }

    /// Takes a token at `now`, if there is one.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes a token at `now` even if there is none, leaving the bucket in debt (for work that
    /// was already done); returns whether the token was there.
    pub fn take_on_credit(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens -= 1.0;
        self.tokens >= 0.0
    }

    /// When the next token is there (`None`: now).
    pub fn ready_at(&self, rate: Rate, now: Instant) -> Option<Instant> {
        let mut b = *self;
        b.refill(rate, now);
        (b.tokens < 1.0).then(|| {
            now + Duration::from_secs_f64((1.0 - b.tokens) / rate.per_sec.max(f64::MIN_POSITIVE))
        })
    }

    /// When the bucket is full again, so that it may be forgotten (`None`: full already).
    pub fn full_at(&self, rate: Rate) -> Option<Instant> {
        let at = self.at?;
        let missing = (rate.burst - self.tokens.min(rate.burst)).max(0.0);
        (missing > 0.0)
            .then(|| at + Duration::from_secs_f64(missing / rate.per_sec.max(f64::MIN_POSITIVE)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let r = Rate::per_sec(10);
        let mut b = TokenBucket::full();
        assert_eq!((0..100).filter(|_| b.take(r, t0)).count(), 10);
        assert!(!b.take(r, t0 + ms(50)));
        assert!(b.take(r, t0 + ms(100)));
        // Over 10 s at most the burst plus 10 a second.
        let mut b = TokenBucket::full();
        let n = (0..10_000u64).filter(|i| b.take(r, t0 + ms(*i))).count();
        assert!((100..=110).contains(&n), "{n}");
    }

    #[test]
    fn ready_and_full_times() {
        let t0 = Instant::now();
        let r = Rate {
            per_sec: 4.0,
            burst: 2.0,
        };
        let mut b = TokenBucket::full();
        assert_eq!(b.full_at(r), None);
        assert_eq!(b.ready_at(r, t0), None);
        assert!(b.take(r, t0) && b.take(r, t0) && !b.take(r, t0));
        assert_eq!(b.ready_at(r, t0), Some(t0 + ms(250)));
        assert_eq!(b.full_at(r), Some(t0 + ms(500)));
        assert_eq!(b.ready_at(r, t0 + ms(250)), None);
        // In debt: the next token comes later.
        let mut b = TokenBucket::full();
        assert!(b.take_on_credit(r, t0) && b.take_on_credit(r, t0));
        assert!(!b.take_on_credit(r, t0));
        assert_eq!(b.ready_at(r, t0), Some(t0 + ms(500)));
    }
}
