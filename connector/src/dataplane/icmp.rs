//! Tokio shell for ICMP echo: unprivileged ICMP sockets to backends (one per agent, echo
//! identifier and service), the per-flow task that rewrites backend echo replies for the agent,
//! and the startup probe that decides whether such sockets are allowed at all.
//!
//! Unprivileged ICMP sockets (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`) need the process's
//! group to be inside `net.ipv4.ping_group_range`. The kernel replaces the echo identifier of
//! everything sent on one with the socket's own, and only delivers replies carrying it; so one
//! socket serves one agent's identifier, and replies get the agent's identifier back.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Weak};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, trace};

use super::flows::{FlowId, FlowKey};
use super::packet;
use super::udp::{BackendSocket, MAX_CONSECUTIVE_ERRORS};
use super::{Agent, Dataplane};

/// Opens an unprivileged ICMP socket, without registering it anywhere.
fn raw_open() -> io::Result<Socket> {
    Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))
}

/// Checks that this process may open unprivileged ICMP sockets (the socket is closed again).
pub(super) fn probe() -> io::Result<()> {
    raw_open().map(drop)
}

/// Opens an unprivileged ICMP socket connected to `backend`. Must run inside a runtime.
pub(super) fn open(backend: Ipv4Addr) -> io::Result<BackendSocket> {
    let socket = raw_open()?;
    socket.set_nonblocking(true)?;
    socket.connect(&SocketAddrV4::new(backend, 0).into())?;
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

/// What an ICMP echo flow's task needs to know about its flow.
pub(super) struct EchoFlowCtx {
    /// The flow's key in the table.
    pub(super) key: FlowKey,
    /// The flow's id in the table.
    pub(super) id: FlowId,
    /// The agent the flow belongs to.
    pub(super) agent: Arc<Agent>,
    /// The service address: the source of replies to the agent.
    pub(super) service: Ipv4Addr,
    /// The agent's echo identifier, restored in replies.
    pub(super) ident: u16,
    /// The data plane, to refresh and close the flow. Weak, so flows don't keep it alive.
    pub(super) dataplane: Weak<Dataplane>,
}

/// One step of an echo flow's task.
enum Received {
    /// An echo reply, already rewritten into a packet for the agent.
    Reply(Result<Vec<u8>, packet::BuildError>),
    /// Some other ICMP message, ignored.
    Other,
    /// The socket reported an error.
    Error(io::Error),
}

/// An ICMP echo flow's task: reads echo replies from the backend and hands them to the agent
/// with the agent's identifier and the service address as source, until the flow is closed
/// (which aborts it), the data plane is dropped, or errors persist.
pub(super) async fn reply_loop(socket: Arc<BackendSocket>, ctx: EchoFlowCtx) {
    let mut errors = 0u32;
    loop {
        let received = socket
            .recv_with(|r| match r {
                Ok(message) => match packet::parse_backend_echo_reply(message) {
                    Some((seq, data)) => Received::Reply(packet::build_echo_reply(
                        ctx.service,
                        ctx.agent.tunnel_ip,
                        ctx.ident,
                        seq,
                        data,
                    )),
                    None => Received::Other,
                },
                Err(e) => Received::Error(e),
            })
            .await;
        let Some(dp) = ctx.dataplane.upgrade() else {
            return;
        };
        match received {
            Received::Reply(Ok(packet)) => {
                errors = 0;
                trace!(
                    agent = ctx.agent.id,
                    len = packet.len(),
                    "ICMP echo reply to agent"
                );
                dp.touch_flow(&ctx.key, ctx.id);
                dp.send_to_agent(&ctx.agent, packet);
            }
            Received::Reply(Err(e)) => dp.backend_error(&ctx.agent, &e),
            Received::Other => trace!(agent = ctx.agent.id, "ignored ICMP message from backend"),
            Received::Error(e) => {
                dp.backend_error(&ctx.agent, &e);
                errors += 1;
                if errors >= MAX_CONSECUTIVE_ERRORS {
                    debug!(agent = ctx.agent.id, key = ?ctx.key, error = %e, "ICMP flow failing; closing it");
                    dp.close_flow(&ctx.key, ctx.id);
                    return;
                }
            }
        }
    }
}
