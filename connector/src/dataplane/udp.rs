//! Tokio shell for UDP flows: the connected, non-blocking backend socket shared with ICMP echo
//! flows ([`BackendSocket`]), opening a UDP flow's socket, and the per-flow task that turns
//! backend replies into packets for the agent.

use std::cell::RefCell;
use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Weak};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::Interest;
use tracing::{debug, trace};

use bytes::Bytes;
use ztna_core::arena::PacketArena;

use super::flows::{Activity, FlowId, FlowKey};
use super::packet;
use super::{Agent, Dataplane};

/// Largest datagram a backend socket can return (UDP: 65507 bytes; ICMP: 65515).
const RECV_BUF_LEN: usize = 65536;

/// Consecutive receive errors (other than a refused port) after which a flow gives up.
pub(super) const MAX_CONSECUTIVE_ERRORS: u32 = 16;

thread_local! {
    /// One receive buffer per runtime thread rather than one per flow: a flow's task reads a
    /// datagram into it and copies it into the packet for the agent before yielding.
    static RECV_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; RECV_BUF_LEN]);
    /// Where the UDP flows' tasks on this thread build their replies to agents.
    static REPLY_ARENA: RefCell<PacketArena> = RefCell::new(PacketArena::with_chunk(REPLY_ARENA_CHUNK));
}

/// Bytes of each buffer of [`REPLY_ARENA`]: 64 KiB, which a 65 507-byte datagram (the largest)
/// fits.
const REPLY_ARENA_CHUNK: usize = 64 * 1024;

/// A connected, non-blocking datagram socket to a backend (UDP, or an unprivileged ICMP
/// socket), registered with the tokio reactor. Closed when dropped.
///
/// Both kinds are held as a `tokio::net::UdpSocket`: at the syscall level an ICMP datagram
/// socket is used exactly like a UDP one (send, recv, readiness), and only those operations are
/// used here, so this needs no `unsafe` fd registration.
pub(crate) struct BackendSocket {
    socket: tokio::net::UdpSocket,
}

impl BackendSocket {
    /// Registers `socket` (already connected) with the reactor. Must run inside a runtime.
    pub(super) fn new(socket: Socket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket))?;
        Ok(Self { socket })
    }

    /// Sends one datagram without waiting: `WouldBlock` when the send buffer is full, and a
    /// pending asynchronous error (such as `ECONNREFUSED`) if there is one.
    ///
    /// This is a direct syscall and deliberately bypasses tokio's readiness tracking: a fresh
    /// socket is writable before the reactor has said so, and a full buffer means the datagram
    /// is dropped anyway.
    pub(crate) fn try_send(&self, datagram: &[u8]) -> io::Result<usize> {
        SockRef::from(&self.socket).send(datagram)
    }

    /// Waits for one datagram or socket error and passes it to `f` (called exactly once).
    ///
    /// Also wakes on error readiness: Linux reports an ICMP error on a connected socket as
    /// EPOLLERR without EPOLLIN, which a plain readable wait (`recv`) would miss.
    pub(crate) async fn recv_with<R>(&self, mut f: impl FnMut(io::Result<&[u8]>) -> R) -> R {
        loop {
            let ready = match self
                .socket
                .ready(Interest::READABLE | Interest::ERROR)
                .await
            {
                Ok(ready) => ready,
                Err(e) => return f(Err(e)),
            };
            // `try_io` needs a single interest (tokio ignores the readiness of combined ones).
            // A pending error is returned by the read before any queued datagram.
            let interest = if ready.is_error() {
                Interest::ERROR
            } else {
                Interest::READABLE
            };
            let done = RECV_BUF.with_borrow_mut(|buf| {
                let read = self.socket.try_io(interest, || {
                    let socket = SockRef::from(&self.socket);
                    (&*socket).read(buf)
                });
                match read {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    Ok(n) => Some(f(Ok(&buf[..n]))),
                    Err(e) => Some(f(Err(e))),
                }
            });
            match done {
                Some(out) => return out,
                // A spurious wake-up: tokio cleared the readiness, so the next wait is real.
                // Yield anyway, so that no readiness state can turn this into a busy loop that
                // starves the runtime.
                None => tokio::task::yield_now().await,
            }
        }
    }
}

/// Opens a UDP socket of `backend`'s family bound to an ephemeral port and connected to
/// `backend`. Must run inside a runtime.
pub(super) fn open(backend: SocketAddr) -> io::Result<BackendSocket> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    socket.set_nonblocking(true)?;
    let any: IpAddr = match backend {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    socket.bind(&SocketAddr::new(any, 0).into())?;
    socket.connect(&backend.into())?;
    BackendSocket::new(socket)
}

/// The flow a backend socket's task serves.
pub(super) struct FlowRef {
    /// The flow's key in the table.
    pub(super) key: FlowKey,
    /// The flow's id in the table.
    pub(super) id: FlowId,
    /// Where the task records the flow's activity (each reply), without the table's lock.
    pub(super) activity: Activity,
    /// The agent the flow belongs to.
    pub(super) agent: Arc<Agent>,
    /// The data plane, to refresh, report and close the flow. Weak, so flows don't keep it alive.
    pub(super) dataplane: Weak<Dataplane>,
}

/// What one datagram from a backend means for the agent.
pub(super) enum Reply {
    /// A packet for the agent (or why it could not be built).
    Packet(Result<Bytes, packet::BuildError>),
    /// Nothing for the agent (say, an ICMP message that is not an echo reply).
    Ignore,
}

/// A flow's task: reads the backend socket until the flow is closed (which aborts it), the data
/// plane is dropped, or errors persist, and hands what `to_agent` makes of each datagram to the
/// agent. `kind` names the flow in logs. With `port_unreachable_from`, a refused port (the
/// backend answered ICMP port unreachable) becomes a port unreachable to the agent from that
/// address; without, it counts as an error like any other.
pub(super) async fn reply_loop(
    socket: Arc<BackendSocket>,
    flow: FlowRef,
    kind: &'static str,
    port_unreachable_from: Option<IpAddr>,
    mut to_agent: impl FnMut(&[u8]) -> Reply,
) {
    let mut errors = 0u32;
    loop {
        let received = socket.recv_with(|r| r.map(&mut to_agent)).await;
        let Some(dp) = flow.dataplane.upgrade() else {
            return;
        };
        match received {
            Ok(Reply::Packet(Ok(packet))) => {
                errors = 0;
                trace!(
                    agent = flow.agent.id,
                    len = packet.len(),
                    kind,
                    "reply to agent"
                );
                flow.activity.touch(std::time::Instant::now());
                dp.send_to_agent(&flow.agent, packet);
            }
            // Can't happen for UDP (65507 bytes fit), but never panic over it.
            Ok(Reply::Packet(Err(e))) => dp.backend_error(&flow.agent, &e),
            Ok(Reply::Ignore) => {
                trace!(agent = flow.agent.id, kind, "ignored message from backend")
            }
            Err(e)
                if e.raw_os_error() == Some(libc::ECONNREFUSED)
                    && port_unreachable_from.is_some() =>
            {
                errors = 0;
                if let (Some(src), Some(quote)) =
                    (port_unreachable_from, dp.flow_quote(&flow.key, flow.id))
                {
                    dp.send_port_unreachable(&flow.agent, src, quote.as_slice());
                }
            }
            Err(e) => {
                dp.backend_error(&flow.agent, &e);
                errors += 1;
                if errors >= MAX_CONSECUTIVE_ERRORS {
                    debug!(agent = flow.agent.id, key = ?flow.key, error = %e, kind, "flow failing; closing it");
                    dp.close_flow(&flow.key, flow.id);
                    return;
                }
            }
        }
    }
}

/// A UDP flow's task: backend datagrams go to the agent from `service` to `agent_addr` (of one
/// family, that of the agent's datagrams, whatever the backend's).
pub(super) async fn udp_replies(
    socket: Arc<BackendSocket>,
    flow: FlowRef,
    service: SocketAddr,
    agent_addr: SocketAddr,
) {
    reply_loop(socket, flow, "UDP", Some(service.ip()), |datagram| {
        Reply::Packet(
            REPLY_ARENA.with_borrow_mut(|arena| {
                packet::build_udp_in(arena, service, agent_addr, datagram)
            }),
        )
    })
    .await;
}
