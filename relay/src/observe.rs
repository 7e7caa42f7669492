//! The second observation port: the relay answers a small request on its main port + 2 with
//! the address the request came from ([`ztna_proto::observe`]). An end compares it with the
//! address the relay observes on its main port; another port means its NAT maps each
//! destination anew (a hard NAT), which decides port prediction (`ztna_core::birthday`).
//!
//! Safe to leave open to the internet: an answer is smaller than its request and tells its
//! receiver only its own address; answers are limited per source address
//! ([`PER_SOURCE`]) and in all ([`TOTAL`]); refused and malformed requests are counted and
//! get nothing. [`Limiter`] is pure; [`serve`] owns the socket.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ztna_core::bucket::{Rate, TokenBucket};
use ztna_proto::observe;

use crate::server::Metrics;

/// Answers per second to one source address (an end sends a few per connection).
pub const PER_SOURCE: u32 = 10;
/// Answers per second in all.
pub const TOTAL: u32 = 2000;
/// Source addresses whose budget is remembered; when full, the table starts over (a flood of
/// sources then shares the global budget, which still holds).
const SOURCES: usize = 4096;

/// Which requests get an answer. Pure.
#[derive(Debug, Default)]
pub struct Limiter {
    sources: HashMap<IpAddr, TokenBucket>,
    total: TokenBucket,
}

impl Limiter {
    /// Whether a request from `from` gets an answer at `now`.
    pub fn allow(&mut self, from: IpAddr, now: Instant) -> bool {
        if self.sources.len() >= SOURCES && !self.sources.contains_key(&from) {
            self.sources.clear();
        }
        let own = self.sources.entry(from).or_default();
        own.take(Rate::per_sec(PER_SOURCE), now) && self.total.take(Rate::per_sec(TOTAL), now)
    }
}

/// What to send back to a datagram `pkt` from `from`, if anything. Pure (counts into
/// `metrics`).
pub fn answer(
    limiter: &mut Limiter,
    metrics: &Metrics,
    pkt: &[u8],
    from: SocketAddr,
    now: Instant,
) -> Option<[u8; observe::RESPONSE_LEN]> {
    let Ok(nonce) = observe::decode_request(pkt) else {
        metrics.observe_dropped.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    if !limiter.allow(from.ip(), now) {
        metrics.observe_limited.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    metrics.observe_answered.fetch_add(1, Ordering::Relaxed);
    Some(observe::encode_answer(&nonce, from))
}

/// Answers requests on `sock` until the task is dropped.
pub async fn serve(sock: tokio::net::UdpSocket, metrics: Arc<Metrics>) {
    let mut limiter = Limiter::default();
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier answers surface here on some systems; keep serving.
                tracing::trace!(error = %e, "observation port receive error");
                continue;
            }
        };
        let Some(reply) = answer(&mut limiter, &metrics, &buf[..n], from, Instant::now()) else {
            continue;
        };
        if let Err(e) = sock.try_send_to(&reply, from) {
            tracing::trace!(error = %e, "observation answer not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    #[test]
    fn a_request_gets_its_source_address_back_and_nothing_else_does() {
        let (mut l, m) = (Limiter::default(), Metrics::default());
        let from: SocketAddr = "198.51.100.4:61000".parse().unwrap();
        let t = Instant::now();
        let req = observe::encode_request(&[9; 16]);
        let ans = answer(&mut l, &m, &req, from, t).expect("answered");
        assert_eq!(observe::decode_answer(&ans), Ok(([9; 16], from)));
        // Short (would amplify), garbage, an answer, a probe: dropped and counted.
        assert!(answer(&mut l, &m, &req[..40], from, t).is_none());
        assert!(answer(&mut l, &m, &[0xc0; 64], from, t).is_none());
        assert!(answer(&mut l, &m, &ans, from, t).is_none());
        assert_eq!(
            (load(&m.observe_answered), load(&m.observe_dropped)),
            (1, 3)
        );
    }

    #[test]
    fn answers_are_limited_per_source_and_a_flood_of_sources_shares_the_total() {
        let (mut l, m) = (Limiter::default(), Metrics::default());
        let req = observe::encode_request(&[1; 16]);
        let t = Instant::now();
        let a: SocketAddr = "198.51.100.4:1".parse().unwrap();
        let answered = (0..100)
            .filter(|_| answer(&mut l, &m, &req, a, t).is_some())
            .count();
        assert_eq!(answered, PER_SOURCE as usize);
        assert_eq!(load(&m.observe_limited), 100 - u64::from(PER_SOURCE));
        // Another source is not held back by the first; a second later the first may ask again.
        assert!(answer(&mut l, &m, &req, "198.51.100.5:1".parse().unwrap(), t).is_some());
        assert!(answer(&mut l, &m, &req, a, t + Duration::from_secs(1)).is_some());
        // 10 000 spoofed sources at one instant get at most the global budget.
        let (mut l, m) = (Limiter::default(), Metrics::default());
        let flood = (0..10_000u32)
            .filter(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
                answer(&mut l, &m, &req, SocketAddr::new(ip.into(), 1), t).is_some()
            })
            .count();
        assert!(flood <= TOTAL as usize, "{flood}");
        assert!(l.sources.len() <= SOURCES);
    }
}
