//! Tokio shell for ICMP echo: unprivileged ICMP sockets to backends (one per agent, echo
//! identifier and service), the per-flow task that rewrites backend echo replies for the agent,
//! and the startup probe that decides whether such sockets are allowed at all.
//!
//! Unprivileged ICMP sockets (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`) need the process's
//! group to be inside `net.ipv4.ping_group_range`. The kernel replaces the echo identifier of
//! everything sent on one with the socket's own, and only delivers replies carrying it; so one
//! socket serves one agent's identifier, and replies get the agent's identifier back.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};

use super::packet;
use super::udp::{reply_loop, BackendSocket, FlowRef, Reply};

/// Opens an unprivileged ICMP (with `v6`, ICMPv6) socket, without registering it anywhere.
fn raw_open(v6: bool) -> io::Result<Socket> {
    if v6 {
        Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::ICMPV6))
    } else {
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))
    }
}

/// Checks that this process may open unprivileged ICMP sockets (the socket is closed again).
/// The same sysctl (`net.ipv4.ping_group_range`) allows ICMPv6 ones.
pub(super) fn probe() -> io::Result<()> {
    raw_open(false).map(drop)
}

/// Opens an unprivileged ICMP socket of `backend`'s family (ICMPv6 for an IPv6 backend)
/// connected to `backend`. Must run inside a runtime.
pub(super) fn open(backend: IpAddr) -> io::Result<BackendSocket> {
    let socket = raw_open(backend.is_ipv6())?;
    socket.set_nonblocking(true)?;
    socket.connect(&SocketAddr::new(backend, 0).into())?;
    BackendSocket::new(socket)
}

/// Explains, for an operator, why [`probe`] failed and what to change.
pub(super) fn explain_probe_failure(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            let range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
                .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unreadable".into());
            let gid = effective_gid().map_or_else(|| "unknown".into(), |g| g.to_string());
            let example = effective_gid().map_or_else(|| "GID GID".into(), |g| format!("{g} {g}"));
            format!(
                "unprivileged ICMP sockets are not allowed for this process ({e}): its group id \
                 {gid} is outside net.ipv4.ping_group_range (currently \"{range}\"). Allow it with \
                 `sysctl -w net.ipv4.ping_group_range=\"{example}\"` (or \"0 2147483647\" for all \
                 groups; persist it in /etc/sysctl.d/)"
            )
        }
        _ => format!(
            "this system does not offer unprivileged ICMP sockets ({e}); they need Linux with \
             net.ipv4.ping_group_range"
        ),
    }
}

/// The process's effective group id, from `/proc/self/status`.
fn effective_gid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Gid:"))?;
    // Gid: real effective saved filesystem
    line.split_whitespace().nth(2)?.parse().ok()
}

/// An ICMP echo flow's task: backend echo replies (ICMPv6 ones if `backend_v6`) go to the
/// agent with the agent's identifier `ident` and the service address as source, in the family
/// of `service`; other ICMP messages are ignored.
pub(super) async fn echo_replies(
    socket: Arc<BackendSocket>,
    flow: FlowRef,
    service: IpAddr,
    ident: u16,
    backend_v6: bool,
) {
    let agent_ip = flow.agent.tunnel_addr(service);
    reply_loop(
        socket,
        flow,
        "ICMP echo",
        None,
        |message| match packet::parse_backend_echo_reply(message, backend_v6) {
            Some((seq, data)) => Reply::Packet(
                packet::build_echo_reply(service, agent_ip, ident, seq, data).map(Into::into),
            ),
            None => Reply::Ignore,
        },
    )
    .await;
}
