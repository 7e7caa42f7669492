//! A node's session with the relay: the outer QUIC connection, its control stream, and the
//! dispatch of channel datagrams into the [`MuxSocket`].
//!
//! [`ControlReader`] and [`ControlWriter`] frame control messages on a QUIC stream; the relay
//! uses them for its side of the same stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use ztna_proto::control::{ControlMessage, ErrorCode, Hello, Role, Welcome};
use ztna_proto::frame::{self, FrameDecoder, FrameError};
use ztna_proto::{ChannelId, ALPN_RELAY};

use crate::agent_machine::Refusal;
use crate::mux::{send_now, MuxSocket, WritableSocket};
use crate::tls::{Credentials, PeerIdentity, TlsError};
use crate::transport::{self, Timing};

/// How long the handshake with the relay (QUIC, TLS, hello and welcome) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Control messages queued for sending before `send` reports the session as stuck.
const CONTROL_QUEUE: usize = 256;

/// Why a relay session could not be set up, or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// quinn refused to start the connection (bad address or configuration).
    #[error("cannot connect to the relay: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("relay connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The relay did not answer in time.
    #[error("the relay did not answer within {0:?}")]
    Timeout(Duration),
    /// The relay refused the session.
    #[error("relay refused the session: {code}: {message}")]
    Refused {
        /// Why.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// The peer broke the control protocol.
    #[error("control protocol: {0}")]
    Protocol(String),
    /// A frame could not be decoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The relay's certificate does not identify a relay.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Writing to or reading from the control stream failed.
    #[error("control stream: {0}")]
    Stream(String),
    /// The session was closed locally.
    #[error("session closed")]
    Closed,
    /// Traffic through the relay stopped coming back and the relay did not answer a ping:
    /// taken as dead (the agent fails over rather than wait for the idle timeout).
    #[error("the relay stopped answering (nothing back for {0:?})")]
    Unresponsive(Duration),
}

/// TLS alerts that mean a certificate will not be accepted however often one retries:
/// bad_certificate, unsupported_certificate, certificate_revoked, certificate_expired,
/// certificate_unknown, unknown_ca, access_denied, certificate_required (RFC 8446 §6).
const PERMANENT_ALERTS: [u8; 8] = [42, 43, 44, 45, 46, 48, 49, 116];

/// The TLS alert inside a QUIC CRYPTO_ERROR code (0x100 + alert), if it is one.
fn tls_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..0x200)
        .contains(&code)
        .then_some((code & 0xff) as u8)
}

impl SessionError {
    /// Whether retrying cannot help: the relay rejected this node's certificate (its TLS alert
    /// names a certificate problem), this node rejected the relay's, or the relay refused the
    /// identity (`unauthorized` or `role mismatch`). `None` for everything transient (timeouts,
    /// resets, a relay restarting, a full address pool).
    pub fn refusal(&self) -> Option<Refusal> {
        let permanent = |code| tls_alert(code).is_some_and(|a| PERMANENT_ALERTS.contains(&a));
        let denied = |code: u64| {
            [ErrorCode::Unauthorized, ErrorCode::RoleMismatch]
                .iter()
                .any(|c| u64::from(c.to_quic()) == code)
        };
        match self {
            // Our own TLS stack rejected the relay's certificate.
            SessionError::Connection(quinn::ConnectionError::TransportError(e))
                if permanent(e.code) =>
            {
                Some(Refusal::RelayUntrusted)
            }
            // The relay's TLS stack rejected ours.
            SessionError::Connection(quinn::ConnectionError::ConnectionClosed(c))
                if permanent(c.error_code) =>
            {
                Some(Refusal::CertificateRejected)
            }
            SessionError::Connection(quinn::ConnectionError::ApplicationClosed(c))
                if denied(c.error_code.into_inner()) =>
            {
                Some(Refusal::Denied)
            }
            SessionError::Refused { code, .. } if denied(u64::from(code.to_quic())) => {
                Some(Refusal::Denied)
            }
            SessionError::Tls(_) => Some(Refusal::RelayUntrusted),
            _ => None,
        }
    }
}

/// Reads framed control messages from a QUIC receive stream.
pub struct ControlReader {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl ControlReader {
    /// Wraps a receive stream.
    pub fn new(stream: quinn::RecvStream) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(),
        }
    }

    /// The next message, `Ok(None)` when the peer finished the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<ControlMessage>, SessionError> {
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(Some(msg));
            }
            match self.stream.read_chunk(frame::MAX_FRAME_LEN, true).await {
                Ok(Some(chunk)) => self.decoder.feed(&chunk.bytes),
                Ok(None) if self.decoder.buffered() == 0 => return Ok(None),
                Ok(None) => {
                    return Err(SessionError::Protocol(
                        "control stream ended inside a frame".into(),
                    ))
                }
                Err(quinn::ReadError::ConnectionLost(e)) => return Err(e.into()),
                Err(e) => return Err(SessionError::Stream(e.to_string())),
            }
        }
    }
}

/// Writes framed control messages to a QUIC send stream.
pub struct ControlWriter {
    stream: quinn::SendStream,
}

impl ControlWriter {
    /// Wraps a send stream.
    pub fn new(stream: quinn::SendStream) -> Self {
        Self { stream }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &ControlMessage) -> Result<(), SessionError> {
        let bytes = frame::encode(msg)?;
        self.stream.write_all(&bytes).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => SessionError::Connection(e),
            e => SessionError::Stream(e.to_string()),
        })
    }

    /// Finishes the stream.
    pub fn finish(&mut self) {
        let _ = self.stream.finish();
    }
}

/// Where the relay is and what name its certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// The relay's UDP address.
    pub addr: SocketAddr,
    /// The DNS name in the relay's certificate.
    pub server_name: String,
}

/// One process's QUIC endpoint on its path-multiplexing socket, with its credentials.
#[derive(Clone)]
pub struct Node {
    endpoint: quinn::Endpoint,
    mux: Arc<MuxSocket>,
    creds: Credentials,
    timing: Timing,
}

impl Node {
    /// Binds the socket and creates the endpoint (client only; a connector adds a server
    /// config with [`quinn::Endpoint::set_server_config`] once it knows the inner MTU).
    pub fn bind(addr: SocketAddr, creds: Credentials, timing: Timing) -> std::io::Result<Self> {
        let mux = MuxSocket::bind(addr)?;
        // Never grease the QUIC fixed bit: a clear fixed bit is how direct-path probes are told
        // apart from QUIC packets on the shared socket.
        let mut endpoint_cfg = creds.endpoint_config();
        endpoint_cfg.grease_quic_bit(false);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_cfg,
            None,
            mux.clone(),
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Self {
            endpoint,
            mux,
            creds,
            timing,
        })
    }

    /// The quinn endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The socket under it.
    pub fn mux(&self) -> &Arc<MuxSocket> {
        &self.mux
    }

    /// This node's credentials.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Keepalive and idle timing.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Connects to the relay, sends `hello` and waits for the welcome.
    pub async fn connect_relay(
        &self,
        target: &RelayTarget,
        hello: Hello,
    ) -> Result<RelaySession, SessionError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(target, hello)).await {
            Ok(r) => r,
            Err(_) => Err(SessionError::Timeout(CONNECT_TIMEOUT)),
        }
    }

    async fn connect_inner(
        &self,
        target: &RelayTarget,
        hello: Hello,
    ) -> Result<RelaySession, SessionError> {
        let mut cfg = quinn::ClientConfig::new(self.creds.client_config(ALPN_RELAY)?);
        cfg.transport_config(transport::outer(self.timing));
        let conn = self
            .endpoint
            .connect_with(cfg, target.addr, &target.server_name)?
            .await?;
        let (reader, writer, welcome) = open_control(&conn, hello).await?;
        Ok(RelaySession::start(
            conn,
            welcome,
            reader,
            writer,
            self.mux.clone(),
        ))
    }
}

/// Queues control messages on a relay session; fails once the session is gone.
#[derive(Debug, Clone)]
pub struct ControlSender(mpsc::Sender<ControlMessage>);

impl ControlSender {
    /// Queues `msg` without waiting.
    pub fn send(&self, msg: ControlMessage) -> Result<(), SessionError> {
        self.0.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SessionError::Stream("control queue full".into()),
            mpsc::error::TrySendError::Closed(_) => SessionError::Closed,
        })
    }
}

/// Checks that the peer of `conn` is a relay, opens the control stream, sends `hello` and waits
/// for the welcome. [`Node::connect_relay`] uses it; so do tools that hold many outer
/// connections on one endpoint (the relay-scale benchmark in `bench/`).
pub async fn open_control(
    conn: &quinn::Connection,
    hello: Hello,
) -> Result<(ControlReader, ControlWriter, Welcome), SessionError> {
    let peer = PeerIdentity::from_connection(conn)?;
    if peer.role != Role::Relay {
        conn.close(ErrorCode::RoleMismatch.to_quic().into(), b"not a relay");
        return Err(SessionError::Protocol(format!("{peer} is not a relay")));
    }
    let (send, recv) = conn.open_bi().await?;
    let mut writer = ControlWriter::new(send);
    let mut reader = ControlReader::new(recv);
    writer.send(&ControlMessage::Hello(hello)).await?;
    let welcome = match reader.next().await? {
        Some(ControlMessage::Welcome(w)) => w,
        Some(ControlMessage::Error { code, message, .. }) => {
            return Err(SessionError::Refused { code, message })
        }
        Some(other) => {
            return Err(SessionError::Protocol(format!(
                "expected welcome, got {}",
                other.kind()
            )))
        }
        None => {
            return Err(SessionError::Protocol(
                "relay closed the control stream".into(),
            ))
        }
    };
    Ok((reader, writer, welcome))
}

/// An established session with the relay. Dropping it closes the connection and takes its
/// channels away from their virtual addresses (which stay, see [`MuxSocket::clear_relay_routes_of`]).
pub struct RelaySession {
    conn: quinn::Connection,
    welcome: Welcome,
    tx: mpsc::Sender<ControlMessage>,
    rx: mpsc::Receiver<Result<ControlMessage, SessionError>>,
    mux: Arc<MuxSocket>,
    tasks: Vec<JoinHandle<()>>,
}

impl RelaySession {
    fn start(
        conn: quinn::Connection,
        welcome: Welcome,
        mut reader: ControlReader,
        mut writer: ControlWriter,
        mux: Arc<MuxSocket>,
    ) -> Self {
        let (tx, mut out_rx) = mpsc::channel::<ControlMessage>(CONTROL_QUEUE);
        let (in_tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let writer_task = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if let Err(e) = writer.send(&msg).await {
                    tracing::debug!(error = %e, "control stream write failed");
                    break;
                }
            }
            writer.finish();
        });
        let reader_conn = conn.clone();
        let reader_task = tokio::spawn(async move {
            loop {
                let item = match reader.next().await {
                    Ok(Some(msg)) => Ok(msg),
                    Ok(None) => Err(SessionError::Protocol(
                        "relay closed the control stream".into(),
                    )),
                    Err(e) => Err(e),
                };
                let end = item.is_err();
                if end {
                    // Prefer the connection's own close reason, if it has one.
                    let item = match reader_conn.close_reason() {
                        Some(reason) => Err(SessionError::Connection(reason)),
                        None => item,
                    };
                    let _ = in_tx.send(item).await;
                    break;
                }
                if in_tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        Self {
            conn,
            welcome,
            tx,
            rx,
            mux,
            tasks: vec![writer_task, reader_task],
        }
    }

    /// The relay's welcome.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The socket under the session (tests and tools).
    pub fn mux(&self) -> &Arc<MuxSocket> {
        &self.mux
    }

    /// The outer connection (for RTT, stats and addresses).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Queues a control message.
    pub fn send(&self, msg: ControlMessage) -> Result<(), SessionError> {
        ControlSender(self.tx.clone()).send(msg)
    }

    /// The next control message from the relay; an error means the session is over.
    pub async fn recv(&mut self) -> Result<ControlMessage, SessionError> {
        match self.rx.recv().await {
            Some(item) => item,
            None => Err(self
                .conn
                .close_reason()
                .map(SessionError::Connection)
                .unwrap_or(SessionError::Closed)),
        }
    }

    /// A handle that queues control messages on this session from elsewhere (the direct-path
    /// drivers send their candidates with it).
    pub fn control_sender(&self) -> ControlSender {
        ControlSender(self.tx.clone())
    }

    /// Routes a new virtual peer address through `channel`.
    pub fn attach_channel(&self, channel: ChannelId) -> SocketAddr {
        self.mux.add_relay_route(&self.conn, channel)
    }

    /// Routes the existing virtual peer address `vaddr` through `channel` (the inner connection
    /// bound to it continues over this session).
    pub fn reattach_channel(&self, vaddr: SocketAddr, channel: ChannelId) {
        self.mux.set_relay_route(vaddr, &self.conn, channel);
    }

    /// Removes a channel's virtual address.
    pub fn detach(&self, addr: SocketAddr) {
        self.mux.remove_route(addr);
    }

    /// Sends `payload` as channel data on `channel` to this session's relay, as a peer would
    /// (tests and tools).
    pub fn send_channel_data(&self, channel: ChannelId, payload: &[u8]) -> std::io::Result<()> {
        let pkt = ztna_proto::datagram::encode(channel, payload);
        send_now(self.mux.udp(), &pkt, self.conn.remote_address()).map(|_| ())
    }
}

impl Drop for RelaySession {
    fn drop(&mut self) {
        // The virtual addresses stay (with their direct paths): inner connections on them
        // continue over a later session's channels.
        self.mux.clear_relay_routes_of(self.conn.stable_id());
        for t in &self.tasks {
            t.abort();
        }
        self.conn.close(0u32.into(), b"session closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn permanent_refusals_are_told_from_transient_errors() {
        let closed = |alert: u8| {
            SessionError::Connection(quinn::ConnectionError::ConnectionClosed(
                quinn::ConnectionClose {
                    error_code: quinn::TransportErrorCode::crypto(alert),
                    frame_type: None,
                    reason: Bytes::new(),
                },
            ))
        };
        // unknown_ca, certificate_expired, certificate_revoked from the relay.
        for alert in [48, 45, 44] {
            assert_eq!(closed(alert).refusal(), Some(Refusal::CertificateRejected));
        }
        // internal_error, handshake_failure: maybe the relay's own trouble.
        assert_eq!(closed(80).refusal(), None);
        assert_eq!(closed(40).refusal(), None);
        let app = |code: ErrorCode| {
            SessionError::Connection(quinn::ConnectionError::ApplicationClosed(
                quinn::ApplicationClose {
                    error_code: code.to_quic().into(),
                    reason: Bytes::new(),
                },
            ))
        };
        assert_eq!(
            app(ErrorCode::Unauthorized).refusal(),
            Some(Refusal::Denied)
        );
        assert_eq!(
            app(ErrorCode::RoleMismatch).refusal(),
            Some(Refusal::Denied)
        );
        assert_eq!(app(ErrorCode::Replaced).refusal(), None);
        assert_eq!(app(ErrorCode::PoolExhausted).refusal(), None);
        let refused = SessionError::Refused {
            code: ErrorCode::Unauthorized,
            message: "denied".into(),
        };
        assert_eq!(refused.refusal(), Some(Refusal::Denied));
        assert_eq!(SessionError::Timeout(CONNECT_TIMEOUT).refusal(), None);
        assert_eq!(
            SessionError::Connection(quinn::ConnectionError::TimedOut).refusal(),
            None
        );
        assert_eq!(
            SessionError::Connection(quinn::ConnectionError::Reset).refusal(),
            None
        );
    }
}
