//! Bounded waiting.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Polls `cond` every 100 ms until it returns true or `timeout` passes (checked once more at the
/// end), and returns how long it took. The number of polls is bounded by the timeout.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) -> Result<Duration> {
    wait_until_every(what, timeout, Duration::from_millis(100), cond)
}

/// [`wait_until`] with a chosen poll interval.
pub fn wait_until_every(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    let interval = interval.max(Duration::from_millis(1));
    let max_polls = timeout.as_millis() / interval.as_millis() + 2;
    for _ in 0..max_polls {
        if cond() {
            return Ok(start.elapsed());
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            break;
        }
        std::thread::sleep(interval.min(timeout - elapsed));
    }
    if cond() {
        return Ok(start.elapsed());
    }
    bail!(
        "timed out after {:.1} s waiting for {what}",
        timeout.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_when_true_and_times_out_when_never() {
        let mut n = 0;
        let took = wait_until("third poll", Duration::from_secs(5), || {
            n += 1;
            n >= 3
        });
        assert!(took.is_ok_and(|d| d < Duration::from_secs(2)));
        let start = Instant::now();
        let err = wait_until_every(
            "never",
            Duration::from_millis(200),
            Duration::from_millis(20),
            || false,
        );
        assert!(err.is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(
            format!("{:#}", err.err().map(|e| e.to_string()).unwrap_or_default()).contains("never")
        );
    }
}
