//! The connector's counters and gauges, exposed to Prometheus.
//!
//! `main.rs` serves [`render`] on its opt-in metrics address through the workspace's shared
//! responder, `ztna_core::metrics_http::serve`, which encodes them with `prometheus-client`.
//!
//! Every field is a plain [`AtomicU64`]: increment counters with
//! `metrics.x.fetch_add(n, Ordering::Relaxed)`; move gauges with [`gauge_inc`] and [`gauge_dec`]
//! (which never wraps below zero).

use std::sync::atomic::{AtomicU64, Ordering};

use ztna_core::metrics_http::{Kind, Sample};
use ztna_core::mux::MuxStats;

/// Prefix of every metric name (`ztna_connector_`).
const PREFIX: &str = "ztna_connector";

/// Declares the [`Metrics`] struct and the table `render` walks, from one list, so the two can't
/// drift apart. The doc comment of each field is also its Prometheus `# HELP` text.
macro_rules! metrics {
    ($( $(#[doc = $doc:literal])+ $name:ident : $kind:ident, )*) => {
        /// The connector's counters and gauges. Shared as `Arc<Metrics>` by the data plane,
        /// `main.rs` and the metrics endpoint.
        #[derive(Debug, Default)]
        pub(crate) struct Metrics {
            $( $(#[doc = $doc])+ pub(crate) $name: AtomicU64, )*
        }

        impl Metrics {
            /// `(name without prefix or suffix, help text, kind, current value)` of every metric.
            fn entries(&self) -> Vec<(&'static str, &'static str, Kind, u64)> {
                vec![$(
                    (
                        stringify!($name),
                        concat!($($doc),+),
                        Kind::$kind,
                        self.$name.load(Ordering::Relaxed),
                    ),
                )*]
            }
        }
    };
}

metrics! {
    /// IP packets received from agents' tunnels.
    packets_from_agents: Counter,
    /// Bytes of IP packets received from agents' tunnels.
    bytes_from_agents: Counter,
    /// IP packets handed to agents' tunnels (including ICMP the connector generates).
    packets_to_agents: Counter,
    /// Bytes of IP packets handed to agents' tunnels.
    bytes_to_agents: Counter,
    /// Packets from agents dropped as malformed: unparsable, neither IPv4 nor IPv6, fragmented (IPv4 fragments that reassembly gave up on are counted in dropped_fragments), bad checksum.
    dropped_malformed: Counter,
    /// Packets from agents dropped because the source was not the agent's tunnel address (IPv4, or for IPv6 the IPv6 tunnel address derived from it).
    dropped_spoofed_source: Counter,
    /// Packets from agents dropped because the destination address, protocol or port is not a service.
    dropped_not_service: Counter,
    /// Packets from agents to a service address policy does not let that agent reach.
    dropped_not_allowed: Counter,
    /// Name mappings agents sent that the connector accepted (name services).
    names_mappings_accepted: Counter,
    /// Name mappings refused: a name or address outside what this connector serves and policy lets the agent reach, a malformed message, or the agent's mapping table full.
    names_mappings_refused: Counter,
    /// Names resolved with the connector's resolver.
    names_resolved: Counter,
    /// Resolutions that failed or found no usable address.
    names_resolve_failures: Counter,
    /// Resolved names evicted from the bounded cache.
    names_cache_evicted: Counter,
    /// Names in the resolver's cache.
    names_cached: Gauge,
    /// Packets or SYNs to a mapped name whose real address is not known (yet): dropped, resolution started.
    dropped_name_unresolved: Counter,
    /// Packets from agents to a service that the connector does not handle (ICMP other than echo).
    dropped_unsupported: Counter,
    /// Packets from agents dropped because the agent's identity (all its tunnels together) already had the maximum number of flows (UDP and ICMP) or TCP connections (SYNs).
    dropped_flow_limit: Counter,
    /// Packets from agents dropped because the connector already had its maximum number of flows (UDP and ICMP) or TCP connections (SYNs), over all agents.
    dropped_global_limit: Counter,
    /// Packets to a port or protocol a service does not serve that were answered (TCP RST, or ICMP destination unreachable, administratively prohibited).
    refused_answered: Counter,
    /// Such packets not answered because the agent tunnel's answer budget was spent.
    refused_answers_limited: Counter,
    /// Packets for an agent dropped because its tunnel could not take them (incremented by the tunnel's sink).
    dropped_to_agent: Counter,
    /// Packets to agents that were larger than the tunnel carries and went as fragments (IPv4, or IPv6 with a fragment header).
    fragmented_to_agents: Counter,
    /// Packets from agents dropped because a backend socket's send buffer was full.
    dropped_to_backend: Counter,
    /// Packets dropped because they came from an agent the data plane does not know.
    dropped_unknown_agent: Counter,
    /// UDP flows opened to backends.
    udp_flows_opened: Counter,
    /// UDP flows closed after their idle timeout.
    udp_flows_expired: Counter,
    /// UDP flows currently open.
    udp_flows_active: Gauge,
    /// ICMP echo flows opened to backends.
    icmp_flows_opened: Counter,
    /// ICMP echo flows closed after their idle timeout.
    icmp_flows_expired: Counter,
    /// ICMP echo flows currently open.
    icmp_flows_active: Gauge,
    /// ICMP echo requests forwarded to backends.
    icmp_echo_backend: Counter,
    /// ICMP echo requests answered by the connector itself.
    icmp_echo_local: Counter,
    /// ICMP destination unreachable (port unreachable) messages sent to agents.
    icmp_unreachable_sent: Counter,
    /// Fragmented datagrams from agents (IPv4 or IPv6) reassembled whole.
    fragments_reassembled: Counter,
    /// Fragments from agents dropped: malformed, conflicting with their datagram's other fragments, or past the per-agent limit of datagrams in reassembly.
    dropped_fragments: Counter,
    /// IPv6 packets from agents dropped because their fixed header is followed by a fragment header that reassembly does not take: an atomic fragment (real fragments are reassembled, their drops counted in dropped_fragments; a fragment header behind another extension header counts in dropped_ipv6_extension_headers).
    dropped_ipv6_fragments: Counter,
    /// IPv6 packets from agents dropped because they carry extension headers (hop-by-hop, routing, destination options, AH, ESP, ...) before the transport header.
    dropped_ipv6_extension_headers: Counter,
    /// TCP connections accepted from agents (backend connected, agent's SYN taken).
    tcp_flows_opened: Counter,
    /// TCP connections currently open.
    tcp_flows_active: Gauge,
    /// TCP connections reset after their idle timeout.
    tcp_flows_expired: Counter,
    /// Agents' SYNs answered with RST because the backend connect failed (refused, unreachable or timed out).
    tcp_refused: Counter,
    /// Backend connects that did not finish within the connect timeout (also counted in tcp_refused).
    tcp_connect_timeouts: Counter,
    /// Open TCP connections ended by a reset: from the agent, from the backend or a backend error, or the idle timeout.
    tcp_reset: Counter,
    /// TCP segments for no connection the connector has (e.g. from before a restart), answered with RST.
    tcp_reset_unknown: Counter,
    /// TCP connections reset, and their backend connection closed, because the agent did not complete the handshake in time.
    tcp_handshake_timeouts: Counter,
    /// TCP connections opened with small buffers because the connector's TCP buffer budget was spent (tcp_buffer_budget_bytes).
    tcp_small_buffers: Counter,
    /// Times the connector's TCP stack found the tunnel to an agent full, held its segments back or left a bulk flow's bytes at its backend (backpressure, not loss).
    tcp_tunnel_full: Counter,
    /// TCP segments from agents dropped because the agent's TCP queue was full.
    tcp_dropped_queue_full: Counter,
    /// Bytes of TCP payload written to backends.
    tcp_bytes_to_backends: Counter,
    /// Bytes of TCP payload read from backends.
    tcp_bytes_from_backends: Counter,
    /// Errors from backend sockets (creation, send or receive) other than a refused port.
    backend_errors: Counter,
    /// Agents currently connected.
    agents_connected: Gauge,
    /// End-to-end handshakes rejected (agent identity did not match the relay's claim).
    inner_handshakes_rejected: Counter,
    /// Live inner connections closed because a deny-list or CRL reload refuses their agent.
    inner_connections_revoked: Counter,
    /// Connections established to the relay.
    relay_connects: Counter,
    /// Relays the connector is registered with now (it is ready, `/readyz`, while at least one).
    relay_connected: Gauge,
    /// Relays in the connector's list (after resolving names).
    relays_known: Gauge,
    /// UDP data plane: 0 per-flow sockets, 1 generic XDP, 2 native XDP.
    xdp_mode: Gauge,
    /// Backend replies the XDP program matched to a flow, rewrote and redirected to an AF_XDP socket (kernel counter).
    xdp_handled: Counter,
    /// Packets the XDP program dropped: the sum of the three xdp_dropped_* reasons (kernel counter).
    xdp_dropped: Counter,
    /// UDP to the flow port range that matched no flow, dropped by the XDP program (kernel counter).
    xdp_dropped_unsolicited: Counter,
    /// Replies to flows dropped by the XDP program because their RX queue had no AF_XDP socket (kernel counter).
    xdp_dropped_no_socket: Counter,
    /// Fragmented UDP to the flow port range, dropped by the XDP program (kernel counter).
    xdp_dropped_malformed: Counter,
    /// Packets the XDP program passed to the kernel's stack: everything not UDP to the flow port range (kernel counter).
    xdp_passed: Counter,
    /// Rewritten replies read from AF_XDP sockets and handed to agents.
    xdp_to_agents: Counter,
    /// Rewritten replies whose UDP checksum userspace completed: the sender had left it to checksum offload (a veth peer or a local sender), which XDP can't see.
    xdp_checksums_completed: Counter,
    /// Replies the kernel could not put on an AF_XDP socket's RX ring, because the ring was full or had no free frame (the connector did not read fast enough), summed over the sockets (their XDP_STATISTICS).
    xdp_rx_ring_dropped: Counter,
    /// Packets read from AF_XDP sockets that matched no open flow (the flow closed meanwhile) and were dropped.
    xdp_rx_unmatched: Counter,
    /// Local ports of the XDP flow port range in use (one per fast-path UDP flow).
    xdp_flow_ports_in_use: Gauge,
}

/// Adds one to a gauge.
pub(crate) fn gauge_inc(gauge: &AtomicU64) {
    gauge.fetch_add(1, Ordering::Relaxed);
}

/// Subtracts one from a gauge, stopping at zero rather than wrapping.
pub(crate) fn gauge_dec(gauge: &AtomicU64) {
    // The closure never returns None, so this can't fail; ignoring the Result is fine.
    let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(1))
    });
}

/// The socket's per-path counters: packets through the relay versus on direct paths, the
/// socket's drops, and direct-path probes.
fn path_samples(stats: &MuxStats, out: &mut Vec<Sample>) {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    #[rustfmt::skip]
    out.extend([
        Sample::counter("relay_tx_packets", "Tunnel packets sent through the relay.", g(&stats.relay_tx_packets)),
        Sample::counter("relay_rx_packets", "Tunnel packets received through the relay.", g(&stats.relay_rx_packets)),
        Sample::counter("direct_tx_packets", "Tunnel packets sent on direct paths.", g(&stats.direct_tx_packets)),
        Sample::counter("direct_rx_packets", "Tunnel packets received on direct paths.", g(&stats.direct_rx_packets)),
        Sample::counter("relay_tx_dropped", "Tunnel packets not sent into a relay channel because the socket's send buffer was full.", g(&stats.relay_tx_dropped)),
        Sample::counter("direct_rx_dropped", "Tunnel packets from a direct path's own socket dropped because quinn was not reading fast enough.", g(&stats.inbound_dropped)),
        Sample::counter("unroutable", "Tunnel packets to an agent with neither a relay channel nor a direct path at that moment.", g(&stats.unroutable)),
        Sample::counter("virtual_source_dropped", "UDP datagrams dropped because their source claimed a tunnel peer's virtual address.", g(&stats.spoofed_dropped)),
        Sample::counter("probes_received", "Direct-path probes received for a known tunnel.", g(&stats.probes_received)),
        Sample::counter("probes_rejected", "Direct-path probes dropped: malformed, unknown tunnel, failed authentication or unexpected.", g(&stats.probes_rejected)),
        Sample::counter("probes_replayed", "Authenticated direct-path probes refused as replays (sequence number seen, or behind the window).", g(&stats.probes_replayed)),
        Sample::counter("probes_stale", "Authenticated direct-path probes refused as stale (sent more than a few seconds ago).", g(&stats.probes_stale)),
        Sample::counter("probes_reflected", "Authenticated direct-path probes refused as reflected (this end's own direction).", g(&stats.probes_reflected)),
        Sample::counter("probe_targets_refused", "Probe targets refused: candidates or ping sources inside service addresses or backend networks.", g(&stats.probe_targets_refused)),
        Sample::counter("probes_limited", "Pongs not sent (per-source budget) and peer-reflexive targets not taken (too many too fast).", g(&stats.probes_limited)),
    ]);
}

/// Every metric of the connector and of its socket (`stats`), in the OpenMetrics text format:
/// names are prefixed `ztna_connector_`, counters end in `_total`.
pub(crate) fn render(metrics: &Metrics, stats: &MuxStats) -> String {
    let mut samples: Vec<Sample> = metrics
        .entries()
        .into_iter()
        .map(|(name, help, kind, value)| Sample {
            name,
            help: help.trim(),
            kind,
            value,
        })
        .collect();
    path_samples(stats, &mut samples);
    ztna_core::metrics_http::encode(PREFIX, samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.packets_from_agents.fetch_add(3, Ordering::Relaxed);
        gauge_inc(&m.udp_flows_active);
        gauge_inc(&m.udp_flows_active);
        gauge_dec(&m.udp_flows_active);
        gauge_dec(&m.agents_connected); // stays at 0
        let stats = MuxStats::default();
        stats.relay_tx_packets.fetch_add(5, Ordering::Relaxed);
        stats.relay_tx_dropped.fetch_add(2, Ordering::Relaxed);
        let text = render(&m, &stats);
        assert!(text.contains(
            "# TYPE ztna_connector_packets_from_agents counter\n\
             ztna_connector_packets_from_agents_total 3\n"
        ));
        assert!(text.contains(
            "# TYPE ztna_connector_udp_flows_active gauge\nztna_connector_udp_flows_active 1\n"
        ));
        assert!(text.contains("ztna_connector_agents_connected 0\n"));
        assert!(text.contains("ztna_connector_relay_tx_packets_total 5\n"));
        assert!(text.contains("ztna_connector_relay_tx_dropped_total 2\n"));
        assert!(text.contains("# HELP ztna_connector_relay_connects Connections"));
        // Every sample line is `name value`, every name is prefixed, counters end in _total, and
        // every field and the 15 socket counters are there exactly once.
        let mut samples = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.split_once(' ').expect("name value");
            assert!(name.starts_with("ztna_connector_"), "{name}");
            value.parse::<u64>().expect("numeric value");
            samples += 1;
        }
        assert_eq!(samples, m.entries().len() + 15);
        for (name, _, kind, _) in m.entries() {
            let full = match kind {
                Kind::Counter => format!("ztna_connector_{name}_total "),
                Kind::Gauge => format!("ztna_connector_{name} "),
            };
            assert_eq!(text.matches(&format!("\n{full}")).count(), 1, "{full}");
        }
    }
}
