//! QUIC transport settings for the outer and inner connections.
//!
//! Both layers pin their MTU (`initial_mtu == min_mtu`, discovery off): quinn's black-hole
//! detection would otherwise shrink a connection's MTU after a loss burst, and datagrams that
//! used to fit would start failing with `TooLarge`. The inner connection's packets travel outside
//! the outer one (as channel data to the relay, or straight to the peer), so its MTU is a
//! constant ([`INNER_MTU`]), and the TUN MTU is checked against what the inner connection can
//! carry. The outer connection carries only the control stream: it takes no datagrams.
//!
//! Every connection runs ztna's own congestion controller ([`crate::congestion`]): it paces and
//! bounds what is in flight by the measured delivery rate, and does not back off on random loss,
//! so the users' own TCP does the congestion control end to end, as through WireGuard. quinn's
//! loss detection keeps its defaults (3 packets, 9/8 RTT): a loss only reaches the controller,
//! which ignores it unless the path is queueing, and datagrams are never retransmitted.

use std::sync::Arc;
use std::time::Duration;

use quinn::{TransportConfig, VarInt};

use crate::congestion::{CarriageFactory, PathChanges};

/// UDP payload size of the outer connection (agent or connector to relay). With 28 bytes of
/// IPv4 and UDP headers this is 1428 bytes on the wire, which fits 1500-byte links with room
/// for PPPoE or a VLAN tag.
pub const OUTER_MTU: u16 = 1400;
/// Default MTU of the TUN device.
pub const DEFAULT_TUN_MTU: u16 = 1280;
/// Smallest inner UDP payload QUIC accepts (RFC 9000's 1200-byte Initial).
pub const MIN_QUIC_MTU: u16 = 1200;

/// Keepalive and idle timing of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often an otherwise idle connection sends a PING. Well under NAT mapping timeouts,
    /// and short enough that a restarted relay is noticed quickly.
    pub keepalive: Duration,
    /// How long without any packet from the peer before the connection is dead.
    pub idle_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
        }
    }
}

fn base(mtu: u16, timing: Timing, changes: Option<PathChanges>) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.initial_mtu(mtu)
        .min_mtu(mtu)
        .mtu_discovery_config(None)
        .keep_alive_interval(Some(timing.keepalive))
        .max_idle_timeout(
            VarInt::try_from(timing.idle_timeout.as_millis() as u64)
                .ok()
                .map(Into::into),
        )
        .datagram_receive_buffer_size(Some(4 << 20))
        .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER)
        .congestion_controller_factory(Arc::new(CarriageFactory { changes }));
    t
}

/// Datagrams waiting for the window or the pacer, per connection: 512 KiB, 80 ms at 50 Mbit/s
/// and 4 ms at 1 Gbit/s. The window ([`crate::congestion`]) is sized to carry the user's TCP
/// without queueing here; this buffer only absorbs bursts, and when it is full quinn drops the
/// oldest datagram (a loss the user's TCP sees, not a growing delay).
pub const DATAGRAM_SEND_BUFFER: usize = 512 << 10;

/// Transport of the outer connection. The control stream is the only stream, and it takes no
/// datagrams (channel data travels outside it, [`ztna_proto::datagram`]).
pub fn outer(timing: Timing) -> Arc<TransportConfig> {
    let mut t = base(OUTER_MTU, timing, None);
    t.max_concurrent_bidi_streams(VarInt::from_u32(2))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None);
    Arc::new(t)
}

/// Transport of the relay's side of outer connections: one control stream, no datagrams (a
/// peer that sends one breaks the protocol and loses its connection), and no keepalives: the
/// clients send theirs (every `timing.keepalive`, well within the idle timeout, and they keep
/// their NAT mappings open), so an idle session costs the relay no timer of its own.
pub fn relay_side(timing: Timing) -> Arc<TransportConfig> {
    let mut t = base(OUTER_MTU, timing, None);
    t.max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(None)
        .datagram_receive_buffer_size(None);
    Arc::new(t)
}

/// Connection attempts the relay's endpoint holds before its accept loop decides on them; the
/// loop decides at once (`ztna_relay::admission`), so this only bounds a burst.
pub const RELAY_MAX_INCOMING: usize = 4096;
/// Bytes of early packets buffered per undecided connection attempt.
pub const RELAY_INCOMING_BUFFER: u64 = 16 * 1024;

/// Endpoint-level limits of the relay's server config: bounded memory for connection attempts
/// that are not decided yet.
pub fn relay_server_limits(cfg: &mut quinn::ServerConfig) {
    cfg.max_incoming(RELAY_MAX_INCOMING)
        .incoming_buffer_size(RELAY_INCOMING_BUFFER)
        .incoming_buffer_size_total(RELAY_MAX_INCOMING as u64 * RELAY_INCOMING_BUFFER / 4);
}

/// UDP payload size of the inner connection. With the channel-data header in front it is 1363
/// bytes to the relay (1391 on the wire over IPv4, 1411 over IPv6), and 1358 on a direct path:
/// both fit 1500-byte links with room for tunnels and tags. (Round 1 derived it from the outer
/// connection's datagram size and kept the same value, so inner packets have not changed size.)
pub const INNER_MTU: u16 = 1358;

/// Transport of the inner connection on the connector's side: IP packets as datagrams, the
/// connector's TCP segments on two unidirectional streams of its own, one for sparse flows and
/// one for bulk flows ([`crate::tcp_carriage`]),
/// and the agent's name streams (one short bidirectional stream per name mapping, see
/// [`ztna_proto::names`]), at most [`NAME_STREAMS`] at once.
pub fn inner(mtu: u16, timing: Timing, changes: Option<PathChanges>) -> Arc<TransportConfig> {
    let mut t = inner_base(mtu, timing, changes);
    t.max_concurrent_bidi_streams(VarInt::from_u32(NAME_STREAMS));
    Arc::new(t)
}

/// Name streams an agent may have open at once on one inner connection.
pub const NAME_STREAMS: u32 = 8;

/// Transport of the inner connection on the agent's side: as [`inner`], the connector may
/// open the [`CARRIAGE_STREAMS`] TCP carriage streams, and the datagram send buffer is
/// [`AGENT_DATAGRAM_SEND_BUFFER`].
pub fn inner_agent(mtu: u16, timing: Timing, changes: Option<PathChanges>) -> Arc<TransportConfig> {
    let mut t = inner_base(mtu, timing, changes);
    t.max_concurrent_uni_streams(VarInt::from_u32(CARRIAGE_STREAMS))
        .datagram_send_buffer_size(AGENT_DATAGRAM_SEND_BUFFER);
    Arc::new(t)
}

/// TCP carriage streams the connector may have open on one inner connection: the bulk stream
/// and the sparse one ([`crate::tcp_carriage`]). An agent that allows one gets everything on
/// the bulk stream.
pub const CARRIAGE_STREAMS: u32 = 2;

/// The agent's datagram send buffer per inner connection: 32 KiB, 5 ms at 50 Mbit/s and
/// 130 us at 2 Gbit/s. Nothing is dropped from it: the Linux agent's TCP packets wait for room
/// in it (`Agent::send_packet_wait`) while nothing else waits, and every other packet that
/// finds it full (and a TCP packet once others wait) waits in the connector link's per-flow
/// fair queue in front of it (`core::fair_queue`), which feeds it as room frees. Under load it stays full, so it is the FIFO delay every packet, a ping too,
/// sees in front of the pacer: small, because the fair queue (where a sparse flow goes ahead)
/// holds the standing queue of a flood. It was 128 KiB, 21 ms at 50 Mbit/s, before the fair
/// queue; 32 KiB moved as much TCP on the clean path (`docs/architecture.md`, "Fair queueing").
pub const AGENT_DATAGRAM_SEND_BUFFER: usize = 32 << 10;

/// Bytes of the TCP carriage stream in flight or waiting per inner connection (quinn's send
/// window and the agent's receive windows): 4 MiB, 1.6 Gbit/s at 20 ms, 210 Mbit/s at 150 ms.
/// It bounds the connector's memory per agent; the connector's TCP stack holds the rest of a
/// download in its own buffers.
pub const TCP_CARRIAGE_WINDOW: u32 = 4 << 20;

fn inner_base(mtu: u16, timing: Timing, changes: Option<PathChanges>) -> TransportConfig {
    let mut t = base(mtu, timing, changes);
    t.max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .send_window(u64::from(TCP_CARRIAGE_WINDOW))
        .stream_receive_window(VarInt::from_u32(TCP_CARRIAGE_WINDOW))
        .receive_window(VarInt::from_u32(TCP_CARRIAGE_WINDOW));
    t
}

/// Why an MTU setting cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MtuError {
    /// The TUN MTU is larger than an inner datagram can carry.
    #[error("TUN MTU {tun} exceeds the {inner} bytes an inner datagram can carry; lower `mtu` to at most {inner}")]
    TunTooLarge {
        /// Configured TUN MTU.
        tun: u16,
        /// Largest inner datagram.
        inner: usize,
    },
    /// The TUN MTU is below the IPv4 minimum this product supports.
    #[error("TUN MTU {0} is below 576")]
    TunTooSmall(u16),
}

/// Checks a TUN MTU against the inner connection's largest datagram.
pub fn check_tun(tun_mtu: u16, inner_max_datagram: Option<usize>) -> Result<(), MtuError> {
    if tun_mtu < 576 {
        return Err(MtuError::TunTooSmall(tun_mtu));
    }
    let inner = inner_max_datagram.unwrap_or(0);
    if usize::from(tun_mtu) > inner {
        return Err(MtuError::TunTooLarge {
            tun: tun_mtu,
            inner,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_arithmetic() {
        const {
            assert!(INNER_MTU >= MIN_QUIC_MTU);
            assert!(INNER_MTU as usize + ztna_proto::datagram::HEADER_LEN <= OUTER_MTU as usize);
        }
        assert!(check_tun(1280, Some(1320)).is_ok());
        assert!(matches!(
            check_tun(1400, Some(1320)),
            Err(MtuError::TunTooLarge { .. })
        ));
        assert!(check_tun(500, Some(1320)).is_err());
    }
}
