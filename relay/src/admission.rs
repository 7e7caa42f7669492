//! Admission of new QUIC connections, pure: what the relay does with each connection attempt
//! (a client's first Initial) before it spends any memory or CPU on a handshake.
//!
//! An unauthenticated attacker can send Initials from any (spoofed) address for free, and each
//! accepted one costs the relay a TLS handshake and tens of kilobytes until it times out. So:
//! - **Address validation when busy:** once [`AdmissionLimits::retry_above`] handshakes are in
//!   progress, an attempt from an address that has not proved it can receive (no Retry token
//!   yet) gets a stateless Retry. Spoofed sources never come back; a real client comes back
//!   one round trip later with a token. Below that (normal operation) nobody pays the extra
//!   round trip.
//! - **Caps:** at most [`AdmissionLimits::max_handshakes`] handshakes in progress, and at most
//!   [`AdmissionLimits::max_per_ip`] from one IPv4 address or IPv6 /64. Over a cap, a validated
//!   attempt is refused (the client hears it at once and backs off); an unvalidated one is
//!   ignored (no packet goes to a possibly spoofed address).
//! - The shell times out handshakes that stall ([`AdmissionLimits::handshake_timeout`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// Limits on handshakes in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Handshakes in progress above which unvalidated attempts get a Retry.
    pub retry_above: usize,
    /// Handshakes in progress at most.
    pub max_handshakes: usize,
    /// Handshakes in progress from one IPv4 address or IPv6 /64 at most.
    pub max_per_ip: usize,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            retry_above: 8,
            // A handshake in progress costs quinn some 20 KiB: 20 MiB at most.
            max_handshakes: 1024,
            // Generous: many agents can share one NAT address (an office reconnecting after a
            // relay restart; the relay-scale benchmark connects 100 at a time from one address).
            max_per_ip: 128,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// What to do with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the handshake (call [`Admission::finished`] when it ends, either way).
    Accept,
    /// Answer with a stateless Retry.
    Retry,
    /// Answer with a stateless refusal.
    Refuse,
    /// Drop the packet.
    Ignore,
}

/// Handshakes in progress, in all and per IP address.
#[derive(Debug, Default)]
pub struct Admission {
    limits: AdmissionLimits,
    active: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Admission {
    /// No handshakes in progress.
    pub fn new(limits: AdmissionLimits) -> Self {
        Self {
            limits,
            active: 0,
            per_ip: HashMap::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    /// Handshakes in progress.
    pub fn active(&self) -> usize {
        self.active
    }

    /// The key `ip` counts under: IPv4 addresses alone, IPv6 addresses by /64 (one host or
    /// site usually holds a whole /64, so per-address counting would be no limit).
    fn key(ip: IpAddr) -> IpAddr {
        // An IPv4 peer on a dual-stack socket: counted as the IPv4 address, not in one /64 with
        // every other IPv4 peer.
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::from(o)
            }
        }
    }

    /// Decides on an attempt from `ip`. `validated`: it carries a valid Retry token (then
    /// `may_retry` is false, as a second Retry is not allowed).
    pub fn decide(&mut self, ip: IpAddr, validated: bool, may_retry: bool) -> Decision {
        let ip = Self::key(ip);
        let over_cap = |s: &Self| {
            s.active >= s.limits.max_handshakes
                || s.per_ip.get(&ip).copied().unwrap_or(0) >= s.limits.max_per_ip
        };
        if !validated && may_retry && (self.active >= self.limits.retry_above || over_cap(self)) {
            return Decision::Retry;
        }
        if over_cap(self) {
            return if validated {
                Decision::Refuse
            } else {
                Decision::Ignore
            };
        }
        self.active += 1;
        *self.per_ip.entry(ip).or_insert(0) += 1;
        Decision::Accept
    }

    /// A handshake accepted for `ip` ended (established, failed or timed out).
    pub fn finished(&mut self, ip: IpAddr) {
        let ip = Self::key(ip);
        self.active = self.active.saturating_sub(1);
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn quiet_relay_accepts_without_retry() {
        let mut a = Admission::new(AdmissionLimits::default());
        for i in 0..8 {
            assert_eq!(a.decide(ip(i), false, true), Decision::Accept);
        }
        assert_eq!(a.active(), 8);
    }

    #[test]
    fn busy_relay_validates_then_caps() {
        let limits = AdmissionLimits {
            retry_above: 2,
            max_handshakes: 4,
            max_per_ip: 2,
            ..AdmissionLimits::default()
        };
        let mut a = Admission::new(limits);
        assert_eq!(a.decide(ip(1), false, true), Decision::Accept);
        assert_eq!(a.decide(ip(2), false, true), Decision::Accept);
        // Busy: a flood of unvalidated attempts costs only stateless Retries.
        for n in 0..1000u32 {
            let src = IpAddr::from(n.to_be_bytes());
            assert_eq!(a.decide(src, false, true), Decision::Retry);
        }
        assert_eq!(a.active(), 2);
        // Validated clients get in up to the caps.
        assert_eq!(a.decide(ip(3), true, false), Decision::Accept);
        assert_eq!(a.decide(ip(3), true, false), Decision::Accept);
        assert_eq!(a.decide(ip(3), true, false), Decision::Refuse, "per-IP cap");
        assert_eq!(a.decide(ip(4), true, false), Decision::Refuse, "total cap");
        // An unvalidated attempt that can't be retried again is dropped silently.
        assert_eq!(a.decide(ip(5), false, false), Decision::Ignore);
        a.finished(ip(3));
        a.finished(ip(1));
        assert_eq!(a.active(), 2);
        assert_eq!(a.decide(ip(3), true, false), Decision::Accept);
        for src in [ip(2), ip(3), ip(3)] {
            a.finished(src);
        }
        assert_eq!(a.active(), 0);
        assert!(a.per_ip.is_empty(), "no entries left behind");
        // finished() without a matching accept does not underflow.
        a.finished(ip(9));
        assert_eq!(a.active(), 0);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let mut a = Admission::new(AdmissionLimits {
            max_per_ip: 1,
            ..AdmissionLimits::default()
        });
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            a.decide(ip("::ffff:192.0.2.1"), true, false),
            Decision::Accept
        );
        assert_eq!(
            a.decide(ip("::ffff:192.0.2.2"), true, false),
            Decision::Accept
        );
        assert_eq!(a.decide(ip("192.0.2.1"), true, false), Decision::Refuse);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let limits = AdmissionLimits {
            max_per_ip: 2,
            ..AdmissionLimits::default()
        };
        let mut a = Admission::new(limits);
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(a.decide(v6("2001:db8::1"), true, false), Decision::Accept);
        assert_eq!(
            a.decide(v6("2001:db8::ffff:2"), true, false),
            Decision::Accept
        );
        assert_eq!(a.decide(v6("2001:db8::3"), true, false), Decision::Refuse);
        assert_eq!(
            a.decide(v6("2001:db8:0:1::3"), true, false),
            Decision::Accept
        );
        a.finished(v6("2001:db8::ffff:2"));
        assert_eq!(a.decide(v6("2001:db8::4"), true, false), Decision::Accept);
    }
}
