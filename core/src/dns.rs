//! The agent's DNS server for name services: the I/O shell around [`crate::names::NameBook`].
//!
//! It listens on UDP at the agent's tunnel IP (port `dns_port`, 53 by default) once the relay
//! assigned one, and answers each query as the book decides. An answer with a new mapping waits
//! until the connector serving the name accepted it on the name stream ([`send_mapping`], at
//! most [`CONFIRM_TIMEOUT`]), so the client's first packet to the address never reaches the
//! connector before the mapping; a refused or unanswered mapping is answered SERVFAIL. Queries
//! outside the match domains go to `dns_upstream` unchanged, when configured.
//!
//! Bounds: at most [`MAX_PENDING`] queries wait for a connector or an upstream at once (more
//! are dropped and counted: the client retries); each waits at most a few seconds.
//!
//! Split DNS (registering the server and the match domains with the host's resolver) is the
//! platform's: [`run`] calls a [`SplitDns`] whenever the server or the domains change.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{watch, Semaphore};
use ztna_proto::names::{encode_mapping, MappingVerdict, NameMapping};

use crate::agent::{Names, TunnelState};
use crate::names::{Decision, Outcome};

/// How long an answer waits for the connector to accept its mapping.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a forwarded query waits for the upstream resolver.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Queries waiting for a connector or an upstream at once.
pub const MAX_PENDING: usize = 128;
/// Largest DNS message read or forwarded (EDNS's common buffer size).
const MAX_MESSAGE: usize = 4096;

/// Sends one mapping on a new name stream of the inner connection `conn` and reads the
/// connector's verdict; `None` if the stream failed or took longer than [`CONFIRM_TIMEOUT`].
pub async fn send_mapping(conn: &quinn::Connection, m: &NameMapping) -> Option<MappingVerdict> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&encode_mapping(m)).await.ok()?;
        send.finish().ok()?;
        let answer = recv.read_to_end(1).await.ok()?;
        MappingVerdict::from_byte(*answer.first()?)
    };
    tokio::time::timeout(CONFIRM_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

/// Sends a connector's mappings again on its new inner connection.
pub(crate) async fn resend_mappings(
    names: Names,
    connector: String,
    conn: quinn::Connection,
    mappings: Vec<NameMapping>,
) {
    let mut accepted = 0usize;
    for m in &mappings {
        if names.confirm_on(&conn, &connector, m).await {
            accepted += 1;
        }
    }
    tracing::debug!(%connector, accepted, total = mappings.len(), "name mappings sent to the new inner connection");
}

/// Registers the agent's DNS server and match domains with the host's resolver (Linux:
/// systemd-resolved for the TUN link).
pub trait SplitDns: Send + 'static {
    /// Routes queries for `domains` to `server` (called again whenever either changes).
    fn apply(&mut self, server: SocketAddr, domains: &[String]);
}

/// How often binding the tunnel IP is tried again while the platform has not assigned it yet.
const BIND_RETRY: Duration = Duration::from_millis(200);
/// Failed binds after which the failure is logged as an error.
const BIND_TRIES_LOGGED: u32 = 25;

/// Runs the DNS server: binds it at the tunnel IP as soon as there is one and the platform has
/// assigned it (again when it changes) and keeps `split` up to date. Runs until the agent's
/// state channel closes.
pub async fn run(
    names: Names,
    mut state: watch::Receiver<TunnelState>,
    mut split: Option<Box<dyn SplitDns>>,
) {
    let port = names.options().port;
    let mut bound: Option<(Ipv4Addr, crate::daemon::AbortOnDrop<()>)> = None;
    let mut applied: Option<(SocketAddr, Vec<String>)> = None;
    let mut failed_binds = 0u32;
    loop {
        let ip = state.borrow_and_update().tunnel_ip;
        if ip != bound.as_ref().map(|(a, _)| *a) {
            if bound.take().is_some() {
                names.set_server(None);
            }
            if let Some(ip) = ip {
                let addr = SocketAddr::from((ip, port));
                match UdpSocket::bind(addr).await {
                    Ok(socket) => {
                        tracing::info!(%addr, "DNS server for name services listening");
                        failed_binds = 0;
                        names.set_server(Some(addr));
                        let task = tokio::spawn(serve(names.clone(), Arc::new(socket)));
                        bound = Some((ip, crate::daemon::AbortOnDrop(task)));
                    }
                    Err(e) => {
                        // Usually the platform has not assigned the address yet.
                        failed_binds += 1;
                        if failed_binds == BIND_TRIES_LOGGED {
                            tracing::error!(%addr, error = %e, "cannot listen for DNS queries; names will not resolve until it can");
                        } else {
                            tracing::debug!(%addr, error = %e, "cannot listen for DNS queries yet");
                        }
                    }
                }
            }
        }
        if let (Some(split), Some((ip, _))) = (split.as_mut(), bound.as_ref()) {
            let now = (SocketAddr::from((*ip, port)), names.match_domains());
            if applied.as_ref() != Some(&now) && !now.1.is_empty() {
                split.apply(now.0, &now.1);
                applied = Some(now);
            }
        }
        let retry = ip.is_some() && bound.is_none();
        let changed = if retry {
            match tokio::time::timeout(BIND_RETRY, state.changed()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        } else {
            state.changed().await
        };
        if changed.is_err() {
            return;
        }
    }
}

/// Answers queries on `socket`.
pub async fn serve(names: Names, socket: Arc<UdpSocket>) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let forward = !names.options().upstream.is_empty();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "DNS receive error");
                continue;
            }
        };
        let query = &buf[..len];
        let c = names.counters();
        match names.decide(query, forward) {
            Decision::Reply { bytes, outcome } => {
                count(&names, outcome);
                let _ = socket.send_to(&bytes, client).await;
            }
            Decision::Drop => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Confirm {
                reply,
                servfail,
                connector,
                mapping,
            } => {
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let (names, socket) = (names.clone(), socket.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let ok = names.confirm(&connector, mapping).await;
                    count(
                        &names,
                        if ok {
                            Outcome::Answered
                        } else {
                            Outcome::Failed
                        },
                    );
                    let _ = socket
                        .send_to(if ok { &reply } else { &servfail }, client)
                        .await;
                });
            }
            Decision::Forward => {
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                c.forwarded.fetch_add(1, Ordering::Relaxed);
                let (socket, query) = (socket.clone(), query.to_vec());
                let upstream = names.options().upstream.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(answer) = ask_upstream(&upstream, &query).await {
                        let _ = socket.send_to(&answer, client).await;
                    }
                });
            }
        }
    }
}

fn count(names: &Names, outcome: Outcome) {
    let c = names.counters();
    let counter = match outcome {
        Outcome::Answered => &c.answered,
        Outcome::Denied => &c.denied,
        Outcome::Refused => &c.refused,
        Outcome::Failed => &c.failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Forwards `query` to each upstream in turn until one answers with the same id.
async fn ask_upstream(upstream: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for server in upstream {
        let bind: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(server).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            loop {
                let n = sock.recv(&mut buf).await.ok()?;
                if buf.get(..2) == Some(id) {
                    return Some(buf[..n].to_vec());
                }
            }
        })
        .await;
        if let Ok(Some(a)) = answer {
            return Some(a);
        }
    }
    None
}
