//! Direct-path probes: small authenticated UDP packets that an agent and a connector send to each
//! other's candidate addresses to open NAT mappings (both at once) and to measure a path's RTT.
//!
//! ```text
//! 0      4     5      6     7        15        23       31          39             len-32    len
//! | magic | ver | kind | dir | tag[8] | txid[8] | seq[8] | time_ms[8] | zero padding | mac[32] |
//! ```
//!
//! - `magic` is `00 7a 74 70` (`\0ztp`). Its first byte has the QUIC fixed bit (0x40) clear, and
//!   ztna's endpoints never grease that bit, so a probe can't be mistaken for a QUIC packet.
//! - `ver` is 2. Version 1 (no `dir`, `seq`, `time_ms`) is refused.
//! - `dir` says who sent it: 1 agent → connector, 2 connector → agent. An end refuses probes
//!   of its own direction, so a probe reflected back at its sender is never answered.
//! - `tag` names the end-to-end connection the probe belongs to; both ends derive it, and the
//!   MAC key, from that connection's TLS exporter, so the relay (which never sees those keys)
//!   can neither read nor forge probes.
//! - `txid` pairs a pong with its ping, which gives the RTT.
//! - `seq` counts every probe (ping or pong) its sender sent on this connection, from 1;
//!   `time_ms` is the sender's monotonic clock in milliseconds. The receiver keeps a
//!   [`ReplayGuard`]: a probe whose `seq` it has seen, or that is older than its window, is a
//!   replay; one whose `time_ms` lags the sender's clock (as the receiver tracks it) by more than
//!   a few seconds is stale. Both are refused, so a captured probe can't be sent again later.
//! - `mac` is HMAC-SHA256 over everything before it, so none of the above can be changed.
//!   Padding lets a ping be as large as a full-size tunnel packet, so a path that answers it
//!   carries full-size packets.

use std::fmt;

use ring::hmac;

/// First four bytes of every probe.
pub const MAGIC: [u8; 4] = [0x00, b'z', b't', b'p'];
/// Probe format version.
pub const VERSION: u8 = 2;
/// Bytes before the padding.
pub const HEADER_LEN: usize = 39;
/// Bytes of the MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// The smallest probe.
pub const MIN_LEN: usize = HEADER_LEN + MAC_LEN;
/// The largest probe accepted or built (a full-size packet on a 1500-byte link).
pub const MAX_LEN: usize = 1472;
/// Sequence numbers a [`ReplayGuard`] remembers behind the highest one seen.
pub const REPLAY_WINDOW: u64 = 128;
/// Default for how far (ms) a probe's `time_ms` may lag before it is stale.
pub const MAX_AGE_MS: u64 = 3000;

/// Identifies the end-to-end connection a probe belongs to.
pub type Tag = [u8; 8];

/// A ping asks for a pong; a pong answers a ping with the same `txid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// Please answer.
    Ping,
    /// The answer.
    Pong,
}

/// Who sent a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the agent (the inner connection's client) to the connector.
    AgentToConnector,
    /// From the connector (the inner connection's server) to the agent.
    ConnectorToAgent,
}

impl Direction {
    /// The other direction: what an end expects to receive when it sends `self`.
    pub fn reverse(self) -> Self {
        match self {
            Direction::AgentToConnector => Direction::ConnectorToAgent,
            Direction::ConnectorToAgent => Direction::AgentToConnector,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Direction::AgentToConnector => 1,
            Direction::ConnectorToAgent => 2,
        }
    }
}

/// A decoded, authenticated probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Ping or pong.
    pub kind: ProbeKind,
    /// Who sent it.
    pub dir: Direction,
    /// The connection it belongs to.
    pub tag: Tag,
    /// Transaction id.
    pub txid: u64,
    /// The sender's probe counter (from 1, one per probe sent, pings and pongs alike).
    pub seq: u64,
    /// The sender's monotonic clock in milliseconds when it sent the probe.
    pub time_ms: u64,
}

/// Why bytes are not a valid probe, or an authenticated probe is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// Shorter than [`MIN_LEN`].
    #[error("probe too short")]
    Truncated,
    /// Longer than [`MAX_LEN`].
    #[error("probe too long")]
    TooLong,
    /// Does not start with [`MAGIC`].
    #[error("not a probe")]
    BadMagic,
    /// Another format version.
    #[error("unsupported probe version {0}")]
    Version(u8),
    /// Unknown kind byte.
    #[error("unknown probe kind {0}")]
    Kind(u8),
    /// Unknown direction byte.
    #[error("unknown probe direction {0}")]
    BadDirection(u8),
    /// The MAC does not verify with the connection's key.
    #[error("probe authentication failed")]
    BadMac,
    /// Authentic, but sent in this end's own direction (reflected back at its sender).
    #[error("probe reflected (sent in the receiver's own direction)")]
    Reflected,
    /// Authentic, but its sequence number was seen already or is behind the replay window.
    #[error("probe replayed")]
    Replayed,
    /// Authentic, but older than the freshness limit.
    #[error("probe stale")]
    Stale,
}

/// The MAC key of one end-to-end connection.
pub struct ProbeKey(hmac::Key);

impl ProbeKey {
    /// A key from 32 secret bytes (from the connection's TLS exporter).
    pub fn new(secret: &[u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }
}

impl fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProbeKey(..)")
    }
}

/// Whether `pkt` starts like a probe (it may still fail to decode).
pub fn is_probe(pkt: &[u8]) -> bool {
    pkt.len() >= MAGIC.len() && pkt[..MAGIC.len()] == MAGIC
}

/// Builds a probe of `len` bytes (clamped to [`MIN_LEN`]..=[`MAX_LEN`]).
pub fn encode(probe: &Probe, key: &ProbeKey, len: usize) -> Vec<u8> {
    let len = len.clamp(MIN_LEN, MAX_LEN);
    let mut out = vec![0u8; len];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[5] = match probe.kind {
        ProbeKind::Ping => 1,
        ProbeKind::Pong => 2,
    };
    out[6] = probe.dir.byte();
    out[7..15].copy_from_slice(&probe.tag);
    out[15..23].copy_from_slice(&probe.txid.to_be_bytes());
    out[23..31].copy_from_slice(&probe.seq.to_be_bytes());
    out[31..39].copy_from_slice(&probe.time_ms.to_be_bytes());
    let mac = hmac::sign(&key.0, &out[..len - MAC_LEN]);
    out[len - MAC_LEN..].copy_from_slice(mac.as_ref());
    out
}

/// Checks the framing and returns the tag, without authenticating (to find the key).
pub fn peek_tag(pkt: &[u8]) -> Result<Tag, ProbeError> {
    if !is_probe(pkt) {
        return Err(ProbeError::BadMagic);
    }
    if pkt.len() < MIN_LEN {
        return Err(ProbeError::Truncated);
    }
    if pkt.len() > MAX_LEN {
        return Err(ProbeError::TooLong);
    }
    if pkt[4] != VERSION {
        return Err(ProbeError::Version(pkt[4]));
    }
    Ok(array(&pkt[7..15]))
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// Decodes and authenticates a probe. This checks only the bytes: the receiver then checks
/// direction and freshness with [`ReplayGuard::admit`].
pub fn decode(pkt: &[u8], key: &ProbeKey) -> Result<Probe, ProbeError> {
    let tag = peek_tag(pkt)?;
    let kind = match pkt[5] {
        1 => ProbeKind::Ping,
        2 => ProbeKind::Pong,
        k => return Err(ProbeError::Kind(k)),
    };
    let dir = match pkt[6] {
        1 => Direction::AgentToConnector,
        2 => Direction::ConnectorToAgent,
        d => return Err(ProbeError::BadDirection(d)),
    };
    let (body, mac) = pkt.split_at(pkt.len() - MAC_LEN);
    hmac::verify(&key.0, body, mac).map_err(|_| ProbeError::BadMac)?;
    Ok(Probe {
        kind,
        dir,
        tag,
        txid: u64::from_be_bytes(array(&pkt[15..23])),
        seq: u64::from_be_bytes(array(&pkt[23..31])),
        time_ms: u64::from_be_bytes(array(&pkt[31..39])),
    })
}

/// The receiving end's memory of one peer's probes: which sequence numbers it has seen (a
/// sliding window of [`REPLAY_WINDOW`], as IPsec and WireGuard keep) and how the peer's clock
/// relates to its own. Pure; the caller passes its monotonic time in milliseconds.
///
/// Clocks: the two ends' monotonic clocks are unrelated, so the guard tracks `offset = now_ms -
/// time_ms` (one-way delay plus the clocks' difference) and keeps its smallest value as the
/// reference; a probe whose offset exceeds the reference by more than `max_age_ms` was sent that
/// much earlier than a fresh one would have been, and is stale. The reference may creep up by
/// 1 ms per accepted probe (clock drift), and a probe whose freshness is proven another way (a
/// pong answering a ping sent moments ago, see [`ReplayGuard::rebase`]) re-anchors it, so a
/// peer whose clock stood still (a suspended laptop) is not locked out.
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    own: Direction,
    max_age_ms: u64,
    highest: u64,
    seen: u128,
    reference: Option<i128>,
}

impl ReplayGuard {
    /// A guard for the end that sends `own`; probes of that direction are reflections.
    pub fn new(own: Direction, max_age_ms: u64) -> Self {
        Self {
            own,
            max_age_ms,
            highest: 0,
            seen: 0,
            reference: None,
        }
    }

    /// Checks an authenticated probe received at `now_ms` and remembers it if admitted.
    /// Refuses reflections, replays (sequence number seen, or [`REPLAY_WINDOW`] or more behind
    /// the highest) and stale probes; a refused probe changes nothing.
    pub fn admit(&mut self, p: &Probe, now_ms: u64) -> Result<(), ProbeError> {
        self.check_replay_and_direction(p)?;
        let offset = i128::from(now_ms) - i128::from(p.time_ms);
        if let Some(r) = self.reference {
            if offset - r > i128::from(self.max_age_ms) {
                return Err(ProbeError::Stale);
            }
        }
        self.record(p.seq);
        self.reference = Some(match self.reference {
            Some(r) if offset > r => r + 1,
            _ => offset,
        });
        Ok(())
    }

    /// Admits a probe that [`ReplayGuard::admit`] found stale but whose freshness the caller
    /// proved otherwise (a pong answering a ping it sent moments ago): the peer's clock jumped,
    /// so the reference is re-anchored at this probe. Reflections and replays are still refused.
    pub fn rebase(&mut self, p: &Probe, now_ms: u64) -> Result<(), ProbeError> {
        self.check_replay_and_direction(p)?;
        self.record(p.seq);
        self.reference = Some(i128::from(now_ms) - i128::from(p.time_ms));
        Ok(())
    }

    fn check_replay_and_direction(&self, p: &Probe) -> Result<(), ProbeError> {
        if p.dir == self.own {
            return Err(ProbeError::Reflected);
        }
        if p.seq == 0 {
            return Err(ProbeError::Replayed);
        }
        if p.seq <= self.highest {
            let back = self.highest - p.seq;
            if back >= REPLAY_WINDOW || self.seen & (1u128 << back) != 0 {
                return Err(ProbeError::Replayed);
            }
        }
        Ok(())
    }

    fn record(&mut self, seq: u64) {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = seq;
        } else {
            self.seen |= 1u128 << (self.highest - seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> ProbeKey {
        ProbeKey::new(&[b; 32])
    }

    const P: Probe = Probe {
        kind: ProbeKind::Ping,
        dir: Direction::AgentToConnector,
        tag: *b"tag12345",
        txid: 0x0102_0304_0506_0708,
        seq: 7,
        time_ms: 123_456,
    };

    fn from_agent(seq: u64, time_ms: u64) -> Probe {
        Probe { seq, time_ms, ..P }
    }

    #[test]
    fn round_trip_and_sizes() {
        for len in [0, MIN_LEN, 100, 1358, MAX_LEN, 9000] {
            let b = encode(&P, &key(1), len);
            assert_eq!(b.len(), len.clamp(MIN_LEN, MAX_LEN));
            assert!(is_probe(&b));
            assert_eq!(decode(&b, &key(1)), Ok(P));
        }
        let pong = Probe {
            kind: ProbeKind::Pong,
            dir: Direction::ConnectorToAgent,
            ..P
        };
        assert_eq!(decode(&encode(&pong, &key(1), 0), &key(1)), Ok(pong));
    }

    #[test]
    fn forgeries_fail() {
        let b = encode(&P, &key(1), 80);
        assert_eq!(decode(&b, &key(2)), Err(ProbeError::BadMac));
        for i in 5..b.len() {
            let mut f = b.clone();
            f[i] ^= 0x01;
            assert!(decode(&f, &key(1)).is_err(), "flipped byte {i} accepted");
        }
        // Direction, sequence number and time are under the MAC: rewriting any fails.
        for (i, v) in [(6, 2u8), (30, 9), (38, 9)] {
            let mut f = b.clone();
            f[i] = v;
            assert!(decode(&f, &key(1)).is_err(), "rewritten byte {i} accepted");
        }
        assert_eq!(
            decode(&b[..MIN_LEN - 1], &key(1)),
            Err(ProbeError::Truncated)
        );
        assert_eq!(decode(&b[..b.len() - 1], &key(1)), Err(ProbeError::BadMac));
        let mut v = b.clone();
        v[4] = 1;
        assert_eq!(
            decode(&v, &key(1)),
            Err(ProbeError::Version(1)),
            "the old format without direction and freshness is refused"
        );
        assert_eq!(decode(&[0x40; 80], &key(1)), Err(ProbeError::BadMagic));
        assert_eq!(
            peek_tag(&vec![0; MAX_LEN + 1]),
            Err(ProbeError::BadMagic),
            "all-zero is not a probe"
        );
    }

    #[test]
    fn never_looks_like_quic() {
        // Every QUIC packet ztna sends has the fixed bit set.
        assert_eq!(MAGIC[0] & 0x40, 0);
    }

    #[test]
    fn replays_are_refused_and_change_nothing() {
        let mut g = ReplayGuard::new(Direction::ConnectorToAgent, MAX_AGE_MS);
        // Live probes: 5 per second for two minutes, 1 ms one-way.
        let mut captured = None;
        for seq in 1..=600u64 {
            let sent = 1_000 + seq * 200;
            let p = from_agent(seq, sent);
            assert_eq!(g.admit(&p, 50_000 + sent + 1), Ok(()));
            if seq == 3 {
                captured = Some(p);
            }
            // Sent again at once: a duplicate.
            assert_eq!(g.admit(&p, 50_000 + sent + 2), Err(ProbeError::Replayed));
        }
        let now = 50_000 + 1_000 + 600 * 200 + 5;
        // The probe captured two minutes ago is far behind the window: refused.
        let old = captured.expect("captured");
        assert_eq!(g.admit(&old, now), Err(ProbeError::Replayed));
        // A probe inside the window, not seen yet (reordered), is accepted once.
        let mut h = ReplayGuard::new(Direction::ConnectorToAgent, MAX_AGE_MS);
        assert_eq!(h.admit(&from_agent(10, 100), 200), Ok(()));
        assert_eq!(h.admit(&from_agent(8, 90), 200), Ok(()));
        assert_eq!(h.admit(&from_agent(8, 90), 201), Err(ProbeError::Replayed));
        assert_eq!(h.admit(&from_agent(10 + REPLAY_WINDOW, 150), 250), Ok(()));
        assert_eq!(
            h.admit(&from_agent(9, 95), 250),
            Err(ProbeError::Replayed),
            "now behind the window"
        );
        assert_eq!(h.admit(&from_agent(0, 150), 250), Err(ProbeError::Replayed));
    }

    #[test]
    fn stale_probes_are_refused_even_with_a_new_sequence_number() {
        let mut g = ReplayGuard::new(Direction::ConnectorToAgent, MAX_AGE_MS);
        // The peer's clock is 1,000,000 ms ahead of ours; probes take 5-20 ms.
        let skew = 1_000_000u64;
        assert_eq!(g.admit(&from_agent(1, skew + 1_000), 1_020), Ok(()));
        assert_eq!(g.admit(&from_agent(2, skew + 1_200), 1_205), Ok(()));
        // seq 3 was captured (and kept from us); it arrives two minutes late.
        let late = from_agent(3, skew + 1_400);
        assert_eq!(g.admit(&late, 121_400), Err(ProbeError::Stale));
        // A late but not stale probe (2.9 s) is fine; one at 3.1 s is not.
        assert_eq!(g.admit(&from_agent(4, skew + 1_600), 4_500), Ok(()));
        assert_eq!(
            g.admit(&from_agent(5, skew + 1_800), 4_918),
            Err(ProbeError::Stale)
        );
        // Refusal changed nothing: seq 5 on time is still welcome.
        assert_eq!(g.admit(&from_agent(5, skew + 1_800), 1_810), Ok(()));
    }

    #[test]
    fn reflections_are_refused() {
        let mut agent = ReplayGuard::new(Direction::AgentToConnector, MAX_AGE_MS);
        assert_eq!(agent.admit(&P, 1), Err(ProbeError::Reflected));
        assert_eq!(agent.rebase(&P, 1), Err(ProbeError::Reflected));
        let from_connector = Probe {
            dir: Direction::ConnectorToAgent,
            ..P
        };
        assert_eq!(agent.admit(&from_connector, 1), Ok(()));
        assert_eq!(Direction::AgentToConnector.reverse(), from_connector.dir);
    }

    #[test]
    fn a_proven_fresh_probe_rebases_a_clock_that_stood_still() {
        let mut g = ReplayGuard::new(Direction::ConnectorToAgent, MAX_AGE_MS);
        assert_eq!(g.admit(&from_agent(1, 1_000), 1_010), Ok(()));
        // The agent slept for an hour: its monotonic clock did not move, ours did.
        let after = from_agent(2, 1_200);
        assert_eq!(g.admit(&after, 3_601_210), Err(ProbeError::Stale));
        assert_eq!(g.rebase(&after, 3_601_210), Ok(()));
        assert_eq!(g.admit(&from_agent(3, 1_400), 3_601_410), Ok(()));
        assert_eq!(g.rebase(&after, 3_601_500), Err(ProbeError::Replayed));
    }

    #[test]
    fn drift_is_followed_slowly() {
        let mut g = ReplayGuard::new(Direction::ConnectorToAgent, 100);
        // Our clock runs 0.1% faster than the peer's (real clocks: ~0.001%): after 10,000
        // probes 200 ms apart the offset grew by 2 s, and each probe is still admitted.
        for seq in 1..=10_000u64 {
            let t = seq * 200;
            assert_eq!(g.admit(&from_agent(seq, t), t + t / 1000), Ok(()), "{seq}");
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = peek_tag(&bytes);
            let _ = decode(&bytes, &key(3));
        }

        #[test]
        fn decode_never_panics_with_magic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = MAGIC.to_vec();
            b.push(VERSION);
            b.extend(tail);
            let _ = decode(&b, &key(3));
        }

        #[test]
        fn a_sequence_number_is_admitted_at_most_once(seqs in proptest::collection::vec(1u64..400, 1..300)) {
            let mut g = ReplayGuard::new(Direction::ConnectorToAgent, MAX_AGE_MS);
            let mut admitted = std::collections::HashSet::new();
            for s in seqs {
                if g.admit(&from_agent(s, 10), 10).is_ok() {
                    prop_assert!(admitted.insert(s), "seq {} admitted twice", s);
                }
            }
        }
    }
}
