//! The relay in-process on loopback: registration and policy, channels and forwarding, and
//! hostile clients that must lose only their own session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{issue, new_ca};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use ztna_core::pki::{self, CertificateAuthority};
use ztna_core::session::{Node, RelaySession, RelayTarget, SessionError};
use ztna_core::tls::{Credentials, TlsFiles};
use ztna_core::transport::{self, Timing};
use ztna_proto::control::{
    Candidate, CandidateKind, ControlMessage, ErrorCode, Hello, Refusal, Role,
};
use ztna_proto::{datagram, ChannelId, PortRange, ServiceDef, ALPN_RELAY};
use ztna_relay::config::RelayConfig;
use ztna_relay::policy::{AccessRule, ConnectorRule, ServiceRule};
use ztna_relay::server::{Relay, Server};

const T: Duration = Duration::from_secs(10);

struct World {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    ca: CertificateAuthority,
    cfg: RelayConfig,
    relay: Arc<Relay>,
    target: RelayTarget,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn catalog_entry(name: &str, last: u8) -> ServiceRule {
    ServiceRule {
        name: name.into(),
        address: [10, 100, 0, last].into(),
        ..ServiceRule::default()
    }
}

impl World {
    /// A relay whose catalog has echo (10.100.0.1), secret (10.100.0.3) and web (10.100.0.4);
    /// group eng may reach echo; conn1 may serve echo, conn2 web.
    async fn start() -> World {
        Self::start_with(|_| {}).await
    }

    async fn start_with(change: impl FnOnce(&mut RelayConfig)) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let ca = new_ca(&dir);
        let files = issue(&ca, &dir, Role::Relay, "relay", &[]);
        let mut cfg = RelayConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ca: Some(files.ca),
            cert: Some(files.cert),
            key: Some(files.key),
            services: vec![
                catalog_entry("echo", 1),
                catalog_entry("secret", 3),
                catalog_entry("web", 4),
            ],
            access: vec![AccessRule {
                services: vec!["echo".into()],
                groups: vec!["eng".into()],
                identities: vec![],
            }],
            connectors: vec![
                ConnectorRule {
                    identity: "conn1".into(),
                    services: vec!["echo".into()],
                },
                ConnectorRule {
                    identity: "conn2".into(),
                    services: vec!["web".into()],
                },
            ],
            ..RelayConfig::default()
        };
        change(&mut cfg);
        let server = Server::bind(&cfg).unwrap();
        let addr = server.local_addr().unwrap();
        let relay = server.relay().clone();
        let server = tokio::spawn(server.run(std::future::pending()));
        World {
            _dir: tmp,
            dir,
            ca,
            cfg,
            relay,
            target: RelayTarget {
                addr,
                server_name: "relay".into(),
            },
            server,
        }
    }

    fn node(&self, role: Role, name: &str, groups: &[&str]) -> Node {
        let files = issue(&self.ca, &self.dir, role, name, groups);
        Node::bind(
            "127.0.0.1:0".parse().unwrap(),
            Credentials::load(&files).unwrap(),
            Timing::default(),
        )
        .unwrap()
    }

    async fn agent(&self, name: &str, want: &[&str]) -> RelaySession {
        let node = self.node(Role::Agent, name, &["eng"]);
        let hello = Hello {
            role: Role::Agent,
            services: vec![],
            want: want.iter().map(|s| s.to_string()).collect(),
            software: "test".into(),
            tunnel_ip: None,
        };
        let s = node.connect_relay(&self.target, hello).await.unwrap();
        std::mem::forget(node); // keep the endpoint alive with the session
        s
    }
}

fn svc(name: &str, last: u8) -> ServiceDef {
    ServiceDef {
        name: name.into(),
        address: [10, 100, 0, last].into(),
        address6: None,
        udp: vec![PortRange::single(7)],
        tcp: vec![],
        icmp: true,
        connector: String::new(),
        names: None,
    }
}

async fn next(s: &mut RelaySession) -> ControlMessage {
    tokio::time::timeout(T, s.recv())
        .await
        .expect("control message in time")
        .expect("session alive")
}

/// A raw client with a valid agent certificate that can write anything on the control stream.
async fn raw_client(
    w: &World,
    name: &str,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let files = issue(&w.ca, &w.dir, Role::Agent, name, &["eng"]);
    let creds = Credentials::load(&files).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = quinn::ClientConfig::new(creds.client_config(ALPN_RELAY).unwrap());
    cfg.transport_config(transport::outer(Timing::default()));
    ep.set_default_client_config(cfg);
    let conn = ep.connect(w.target.addr, "relay").unwrap().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (ep, conn, send, recv)
}

async fn closed_with(conn: &quinn::Connection) -> u64 {
    match tokio::time::timeout(T, conn.closed())
        .await
        .expect("relay closes the session in time")
    {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
        other => panic!("unexpected close: {other}"),
    }
}

/// The second observation port (main port + 2) answers a whole address request with the
/// sender's own address, and nothing else: a short request (the answer would amplify it) and
/// garbage are dropped and counted.
#[tokio::test]
async fn the_second_port_tells_a_socket_its_own_address_and_never_amplifies() {
    use ztna_proto::observe;
    let w = World::start().await;
    let second = SocketAddr::new(
        w.target.addr.ip(),
        w.target.addr.port() + observe::PORT_OFFSET,
    );
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let mut buf = [0u8; 256];
    sock.send_to(&observe::encode_request(&[5; 16]), second)
        .await
        .unwrap();
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(from, second);
    assert!(n < observe::REQUEST_LEN);
    assert_eq!(observe::decode_answer(&buf[..n]), Ok(([5; 16], me)));
    sock.send_to(&observe::encode_request(&[6; 16])[..40], second)
        .await
        .unwrap();
    sock.send_to(b"hello", second).await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await;
    assert!(quiet.is_err(), "no answer to a short request or garbage");
    let m = &w.relay.metrics;
    assert_eq!(m.observe_answered.load(Ordering::Relaxed), 1);
    assert_eq!(m.observe_dropped.load(Ordering::Relaxed), 2);
    assert!(m.render().contains("ztna_relay_observe_answered_total 1"));
}

#[tokio::test]
async fn registration_policy_channels_and_forwarding() {
    let w = World::start().await;
    let mut alice = w.agent("alice", &["echo", "secret"]).await;
    let welcome = alice.welcome().clone();
    assert!(welcome.tunnel_ip.is_some_and(|ip| ip.octets()[0] == 100));
    assert!(welcome.services.is_empty(), "no connector yet");
    assert_eq!(welcome.rejected.len(), 1);
    assert_eq!(welcome.rejected[0].name, "secret");
    assert_eq!(welcome.rejected[0].code, ErrorCode::Unauthorized);

    // A channel to a connector that is not there is refused with a clear code.
    alice
        .send(ControlMessage::OpenChannel {
            request_id: 1,
            connector: "conn1".into(),
        })
        .unwrap();
    match next(&mut alice).await {
        ControlMessage::Error {
            code, request_id, ..
        } => {
            assert_eq!(code, ErrorCode::ConnectorOffline);
            assert_eq!(request_id, Some(1));
        }
        other => panic!("unexpected {other:?}"),
    }

    // The connector registers echo (allowed) and secret (not allowed).
    let cnode = w.node(Role::Connector, "conn1", &[]);
    let hello = Hello {
        role: Role::Connector,
        services: vec![svc("echo", 1), svc("secret", 3)],
        want: vec![],
        software: "test".into(),
        tunnel_ip: None,
    };
    let mut conn1 = cnode.connect_relay(&w.target, hello).await.unwrap();
    let cw = conn1.welcome().clone();
    assert_eq!(
        cw.services
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        vec!["echo"]
    );
    assert_eq!(cw.rejected[0].name, "secret");
    assert_eq!(cw.rejected[0].code, ErrorCode::NotAllowedToServe);

    // The agent hears about echo, served by conn1.
    match next(&mut alice).await {
        ControlMessage::Catalog(c) => {
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].name, "echo");
            assert_eq!(c[0].connector, "conn1");
        }
        other => panic!("unexpected {other:?}"),
    }

    // The connector hears of the channel first, with the agent's identity and tunnel IP; the
    // agent hears it is open only once the connector accepted it.
    alice
        .send(ControlMessage::OpenChannel {
            request_id: 2,
            connector: "conn1".into(),
        })
        .unwrap();
    let ch = match next(&mut conn1).await {
        ControlMessage::IncomingChannel {
            channel_id,
            agent,
            agent_tunnel_ip,
            services,
        } => {
            assert_eq!(agent, "alice");
            // Only what policy allows alice at this connector: echo, not the refused secret.
            assert_eq!(services, vec![std::net::Ipv4Addr::new(10, 100, 0, 1)]);
            assert_eq!(Some(agent_tunnel_ip), welcome.tunnel_ip);
            channel_id
        }
        other => panic!("unexpected {other:?}"),
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(200), alice.recv())
            .await
            .is_err(),
        "no answer before the connector accepts"
    );
    conn1
        .send(ControlMessage::ChannelAccepted { channel_id: ch })
        .unwrap();
    match next(&mut alice).await {
        ControlMessage::ChannelOpened {
            request_id: 2,
            channel_id,
            connector,
        } => {
            assert_eq!(connector, "conn1");
            assert_eq!(channel_id, ch);
        }
        other => panic!("unexpected {other:?}"),
    }
    // A connector that never accepts leaves the agent with a clear error when it goes.
    alice
        .send(ControlMessage::OpenChannel {
            request_id: 3,
            connector: "conn1".into(),
        })
        .unwrap();
    let pending = match next(&mut conn1).await {
        ControlMessage::IncomingChannel { channel_id, .. } => channel_id,
        other => panic!("unexpected {other:?}"),
    };
    conn1
        .send(ControlMessage::ChannelClosed {
            channel_id: pending,
            code: ErrorCode::Limit,
        })
        .unwrap();
    match next(&mut alice).await {
        ControlMessage::Error {
            request_id: Some(3),
            code,
            ..
        } => assert_eq!(code, ErrorCode::Limit),
        other => panic!("unexpected {other:?}"),
    }

    // Channel data on the channel reaches the connector's socket through the relay; on another
    // channel number it is dropped and counted.
    let id = ChannelId::new(ch).unwrap();
    conn1.attach_channel(id);
    let before = w.relay.metrics.datagrams_forwarded.load(Ordering::Relaxed);
    for _ in 0..10 {
        alice.send_channel_data(id, b"opaque").unwrap();
    }
    let bogus = ChannelId::new(ch + 100).unwrap();
    alice.send_channel_data(bogus, b"opaque").unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while w.relay.metrics.datagrams_forwarded.load(Ordering::Relaxed) < before + 10
        || w.relay
            .metrics
            .channel_dropped_unknown
            .load(Ordering::Relaxed)
            < 1
        || cnode.mux().stats().relay_rx_packets.load(Ordering::Relaxed) < 10
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "channel data not forwarded/dropped in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Candidates are brokered: forwarded to the other end with the sender's observed address
    // added as a reflexive candidate.
    let host: SocketAddr = "192.0.2.44:5000".parse().unwrap();
    alice
        .send(ControlMessage::Candidates {
            channel_id: ch,
            candidates: vec![Candidate {
                addr: host,
                kind: CandidateKind::Host,
            }],
        })
        .unwrap();
    match next(&mut conn1).await {
        ControlMessage::Candidates {
            channel_id,
            candidates,
        } => {
            assert_eq!(channel_id, ch);
            assert_eq!(candidates.len(), 2);
            assert_eq!(candidates[0].kind, CandidateKind::Reflexive);
            assert_eq!(candidates[0].addr, welcome.observed_addr);
            assert_eq!(candidates[1].addr, host);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        w.relay.metrics.candidates_forwarded.load(Ordering::Relaxed),
        1
    );
    // A second list right away is dropped (and counted), not queued towards the connector.
    alice
        .send(ControlMessage::Candidates {
            channel_id: ch,
            candidates: vec![],
        })
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while w.relay.metrics.candidates_dropped.load(Ordering::Relaxed) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "not dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The connector leaving closes the channel and empties the agent's catalog.
    drop(conn1);
    let mut saw_closed = false;
    let mut saw_empty = false;
    while !(saw_closed && saw_empty) {
        match next(&mut alice).await {
            ControlMessage::ChannelClosed { channel_id, code } => {
                assert_eq!(channel_id, ch);
                assert_eq!(code, ErrorCode::PeerGone);
                saw_closed = true;
            }
            ControlMessage::Catalog(c) => {
                assert!(c.is_empty());
                saw_empty = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    w.server.abort();
}

#[tokio::test]
async fn hostile_control_messages_close_only_that_session() {
    let w = World::start().await;
    let mut good = w.agent("alice", &[]).await;

    // An oversized length prefix.
    let (_ep1, c1, mut s1, _r1) = raw_client(&w, "mallory1").await;
    s1.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert_eq!(
        closed_with(&c1).await,
        u64::from(ErrorCode::Malformed.to_quic())
    );

    // A frame of the right size whose body is garbage.
    let (_ep2, c2, mut s2, _r2) = raw_client(&w, "mallory2").await;
    s2.write_all(&[0, 0, 0, 6, 1, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert_eq!(
        closed_with(&c2).await,
        u64::from(ErrorCode::Malformed.to_quic())
    );

    // A wrong protocol version.
    let (_ep3, c3, mut s3, _r3) = raw_client(&w, "mallory3").await;
    s3.write_all(&[0, 0, 0, 2, 99, 0]).await.unwrap();
    assert_eq!(
        closed_with(&c3).await,
        u64::from(ErrorCode::Malformed.to_quic())
    );

    // A valid hello claiming the wrong role.
    let (_ep4, c4, mut s4, _r4) = raw_client(&w, "mallory4").await;
    let hello = ControlMessage::Hello(Hello {
        role: Role::Connector,
        services: vec![svc("echo", 1)],
        want: vec![],
        software: "x".into(),
        tunnel_ip: None,
    });
    s4.write_all(&ztna_proto::frame::encode(&hello).unwrap())
        .await
        .unwrap();
    assert_eq!(
        closed_with(&c4).await,
        u64::from(ErrorCode::RoleMismatch.to_quic())
    );

    // A good hello, then an out-of-place message after the welcome.
    let (_ep5, c5, mut s5, _r5) = raw_client(&w, "mallory5").await;
    let hello = ControlMessage::Hello(Hello {
        role: Role::Agent,
        services: vec![],
        want: vec![],
        software: "x".into(),
        tunnel_ip: None,
    });
    s5.write_all(&ztna_proto::frame::encode(&hello).unwrap())
        .await
        .unwrap();
    s5.write_all(&ztna_proto::frame::encode(&hello).unwrap())
        .await
        .unwrap();
    assert_eq!(
        closed_with(&c5).await,
        u64::from(ErrorCode::Malformed.to_quic())
    );

    // A good session that sends an oversized candidate list.
    let flood = w.agent("mallory6", &[]).await;
    let many = (0..100u16)
        .map(|p| Candidate {
            addr: SocketAddr::from(([192, 0, 2, 1], 1000 + p)),
            kind: CandidateKind::Host,
        })
        .collect();
    flood
        .send(ControlMessage::Candidates {
            channel_id: 1,
            candidates: many,
        })
        .unwrap();
    assert_eq!(
        closed_with(flood.connection()).await,
        u64::from(ErrorCode::Malformed.to_quic())
    );

    let errors = w.relay.metrics.control_errors.load(Ordering::Relaxed);
    let rejected = w.relay.metrics.sessions_rejected.load(Ordering::Relaxed);
    assert!(
        errors >= 4 && rejected >= 1,
        "control errors {errors}, rejected {rejected}"
    );
    // The well-behaved session is still served.
    good.send(ControlMessage::OpenChannel {
        request_id: 7,
        connector: "nobody".into(),
    })
    .unwrap();
    match next(&mut good).await {
        ControlMessage::Error {
            request_id: Some(7),
            code,
            ..
        } => assert_eq!(code, ErrorCode::ConnectorOffline),
        other => panic!("unexpected {other:?}"),
    }
    w.server.abort();
}

#[tokio::test]
async fn other_ca_and_wrong_roles_are_refused() {
    let w = World::start().await;
    // A certificate from another CA fails the handshake.
    let other = CertificateAuthority::generate("Other").unwrap();
    let odir = tempfile::tempdir().unwrap();
    pki::write_new(&odir.path().join("ca.pem"), &other.cert_pem(), false).unwrap();
    let mut files = issue(&other, odir.path(), Role::Agent, "eve", &["eng"]);
    // Eve trusts the real CA (so she can verify the relay), but her certificate is not from it.
    files.ca = w.dir.join("ca.pem");
    let node = Node::bind(
        "127.0.0.1:0".parse().unwrap(),
        Credentials::load(&files).unwrap(),
        Timing::default(),
    )
    .unwrap();
    let hello = Hello {
        role: Role::Agent,
        services: vec![],
        want: vec![],
        software: "x".into(),
        tunnel_ip: None,
    };
    let err = node
        .connect_relay(&w.target, hello.clone())
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            SessionError::Connection(_) | SessionError::Stream(_) | SessionError::Protocol(_)
        ),
        "{err}"
    );
    let deadline = tokio::time::Instant::now() + T;
    while w.relay.metrics.handshakes_failed.load(Ordering::Relaxed) < 1 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(w.relay.metrics.sessions_total.load(Ordering::Relaxed), 0);

    // A client that expects a relay under another name refuses the relay's certificate.
    let node = w.node(Role::Agent, "alice", &["eng"]);
    let wrong = RelayTarget {
        addr: w.target.addr,
        server_name: "not-the-relay".into(),
    };
    assert!(node.connect_relay(&wrong, hello).await.is_err());

    // A connector that is not allowed anything still connects, with everything refused.
    let c = w.node(Role::Connector, "rogue", &[]);
    let h = Hello {
        role: Role::Connector,
        services: vec![svc("echo", 1)],
        want: vec![],
        software: "x".into(),
        tunnel_ip: None,
    };
    let s = c.connect_relay(&w.target, h).await.unwrap();
    assert!(s.welcome().services.is_empty());
    assert_eq!(s.welcome().rejected[0].code, ErrorCode::NotAllowedToServe);
    w.server.abort();
}

#[tokio::test]
async fn a_second_session_of_one_identity_replaces_the_first() {
    let w = World::start().await;
    let first = w.agent("alice", &[]).await;
    let ip1 = first.welcome().tunnel_ip;
    let second = w.agent("alice", &[]).await;
    assert_eq!(
        second.welcome().tunnel_ip,
        ip1,
        "tunnel IP is stable per identity"
    );
    let code = closed_with(first.connection()).await;
    assert_eq!(code, u64::from(ErrorCode::Replaced.to_quic()));
    let _ = SocketAddr::from(([127, 0, 0, 1], 0));
    w.server.abort();
}

fn conn_hello(services: Vec<ServiceDef>) -> Hello {
    Hello {
        role: Role::Connector,
        services,
        want: vec![],
        software: "test".into(),
        tunnel_ip: None,
    }
}

/// Connects connector `name` announcing `services`; the node is kept alive with the session.
async fn connector(w: &World, name: &str, services: Vec<ServiceDef>) -> RelaySession {
    let node = w.node(Role::Connector, name, &[]);
    let s = node
        .connect_relay(&w.target, conn_hello(services))
        .await
        .unwrap();
    std::mem::forget(node);
    s
}

/// An agent in `groups`.
async fn agent_in(w: &World, name: &str, groups: &[&str]) -> RelaySession {
    let node = w.node(Role::Agent, name, groups);
    let hello = Hello {
        role: Role::Agent,
        services: vec![],
        want: vec![],
        software: "test".into(),
        tunnel_ip: None,
    };
    let s = node.connect_relay(&w.target, hello).await.unwrap();
    std::mem::forget(node);
    s
}

/// Opens a channel from `agent` to `conn` (which accepts it); returns the channel id and the
/// service addresses the connector was told the agent may reach.
async fn open_channel(
    agent: &mut RelaySession,
    conn: &mut RelaySession,
    name: &str,
    request_id: u32,
) -> (u32, Vec<std::net::Ipv4Addr>) {
    agent
        .send(ControlMessage::OpenChannel {
            request_id,
            connector: name.into(),
        })
        .unwrap();
    let (ch, allowed) = match next(conn).await {
        ControlMessage::IncomingChannel {
            channel_id,
            services,
            ..
        } => (channel_id, services),
        other => panic!("unexpected {other:?}"),
    };
    conn.send(ControlMessage::ChannelAccepted { channel_id: ch })
        .unwrap();
    match next(agent).await {
        ControlMessage::ChannelOpened { channel_id, .. } => assert_eq!(channel_id, ch),
        other => panic!("unexpected {other:?}"),
    }
    (ch, allowed)
}

async fn quiet(s: &mut RelaySession, what: &str) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), s.recv()).await {
        panic!("{what}: expected nothing, got {m:?}");
    }
}

/// The round-1 hole: a connector allowed one service announced it at any address and took over
/// another connector's address while that one restarted (here: conn2, allowed only `web`,
/// announces web at echo's address while conn1 is away). Policy now owns every name's address.
#[tokio::test]
async fn a_connector_cannot_move_or_take_over_an_address() {
    let w = World::start_with(|c| c.access[0].services = vec!["*".into()]).await;
    let mut alice = w.agent("alice", &[]).await;
    assert!(alice.welcome().services.is_empty());

    let c2 = connector(
        &w,
        "conn2",
        vec![svc("web", 1), svc("echo", 1), svc("grab", 9)],
    )
    .await;
    let got: Vec<(String, ErrorCode)> = c2
        .welcome()
        .rejected
        .iter()
        .map(|r| (r.name.clone(), r.code))
        .collect();
    assert_eq!(
        got,
        vec![
            ("web".to_owned(), ErrorCode::PolicyMismatch),
            ("echo".to_owned(), ErrorCode::NotAllowedToServe),
            ("grab".to_owned(), ErrorCode::UnknownService),
        ]
    );
    assert!(c2.welcome().services.is_empty());
    quiet(&mut alice, "alice's catalog after refused announcements").await;
    assert_eq!(w.relay.metrics.services_rejected.load(Ordering::Relaxed), 3);

    // At its own address web is accepted, served by conn2.
    let c2 = connector(&w, "conn2", vec![svc("web", 4)]).await;
    assert_eq!(c2.welcome().services.len(), 1);
    match next(&mut alice).await {
        ControlMessage::Catalog(c) => {
            assert_eq!(c.len(), 1);
            assert_eq!(
                (c[0].name.as_str(), c[0].address, c[0].connector.as_str()),
                ("web", [10, 100, 0, 4].into(), "conn2")
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // conn1 comes back to echo's address.
    let c1 = connector(&w, "conn1", vec![svc("echo", 1)]).await;
    assert_eq!(c1.welcome().services.len(), 1);
    match next(&mut alice).await {
        ControlMessage::Catalog(c) => {
            let got: Vec<_> = c.iter().map(|s| (s.name.as_str(), s.address)).collect();
            assert_eq!(
                got,
                vec![
                    ("echo", [10, 100, 0, 1].into()),
                    ("web", [10, 100, 0, 4].into())
                ]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    drop((c1, c2));
    w.server.abort();
}

/// Reloading the policy keeps what is still allowed and closes the rest; a policy that does not
/// validate changes nothing; a deny list closes live sessions, and the handshake refuses them
/// from then on.
#[tokio::test]
async fn policy_reload_keeps_allowed_sessions_and_closes_the_rest() {
    let w = World::start_with(|c| {
        c.access = vec![
            AccessRule {
                services: vec!["echo".into(), "web".into()],
                groups: vec!["eng".into()],
                identities: vec![],
            },
            AccessRule {
                services: vec!["web".into()],
                groups: vec![],
                identities: vec!["bob".into()],
            },
        ];
        c.connectors[0].services = vec!["echo".into(), "web".into()];
    })
    .await;
    let mut conn1 = connector(&w, "conn1", vec![svc("echo", 1), svc("web", 4)]).await;
    assert_eq!(conn1.welcome().services.len(), 2);
    let mut alice = w.agent("alice", &[]).await;
    let mut bob = agent_in(&w, "bob", &["ops"]).await;
    assert_eq!(alice.welcome().services.len(), 2);
    assert_eq!(bob.welcome().services.len(), 1);
    let (ch_a, allowed) = open_channel(&mut alice, &mut conn1, "conn1", 1).await;
    assert_eq!(allowed.len(), 2);
    let (ch_b, _) = open_channel(&mut bob, &mut conn1, "conn1", 1).await;

    // 1. eng loses echo: alice's channel no longer matches and is closed, and she gets her new
    //    catalog; bob's channel is untouched.
    let mut cfg = w.cfg.clone();
    cfg.access[0].services = vec!["web".into()];
    let sum = ztna_relay::reload::reload_once(&w.relay, &cfg).unwrap();
    assert_eq!((sum.channels_closed, sum.sessions_closed), (1, 0));
    let (mut closed, mut catalog) = (false, false);
    while !(closed && catalog) {
        match next(&mut alice).await {
            ControlMessage::ChannelClosed { channel_id, code } => {
                assert_eq!((channel_id, code), (ch_a, ErrorCode::PolicyChanged));
                closed = true;
            }
            ControlMessage::Catalog(c) => {
                let names: Vec<_> = c.iter().map(|s| s.name.as_str()).collect();
                assert_eq!(names, vec!["web"]);
                catalog = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    match next(&mut conn1).await {
        ControlMessage::ChannelClosed { channel_id, code } => {
            assert_eq!((channel_id, code), (ch_a, ErrorCode::PolicyChanged))
        }
        other => panic!("unexpected {other:?}"),
    }
    quiet(&mut bob, "bob after a reload that keeps his access").await;
    // A new channel carries only what alice may reach now.
    let (_, allowed) = open_channel(&mut alice, &mut conn1, "conn1", 2).await;
    assert_eq!(allowed, vec![std::net::Ipv4Addr::new(10, 100, 0, 4)]);

    // 2. A policy that does not validate (web inside the tunnel pool) is refused whole.
    let mut bad = cfg.clone();
    bad.services[2].address = [100, 64, 0, 9].into();
    let e = ztna_relay::reload::reload_once(&w.relay, &bad).unwrap_err();
    assert!(format!("{e:#}").contains("tunnel pool"), "{e:#}");
    assert_eq!(
        w.relay.policy().service("web").unwrap().address,
        std::net::Ipv4Addr::new(10, 100, 0, 4)
    );
    quiet(&mut bob, "bob after a refused reload").await;

    // 3. bob is denied: his live session is closed with IdentityDenied and his channel with
    //    it; alice is untouched.
    let deny = w.dir.join("deny.toml");
    std::fs::write(&deny, "identities = [\"bob\"]\n").unwrap();
    cfg.deny_list = Some(deny.clone());
    let sum = ztna_relay::reload::reload_once(&w.relay, &cfg).unwrap();
    assert_eq!(sum.sessions_closed, 1);
    assert_eq!(
        closed_with(bob.connection()).await,
        u64::from(ErrorCode::IdentityDenied.to_quic())
    );
    match next(&mut conn1).await {
        ControlMessage::ChannelClosed { channel_id, code } => {
            assert_eq!((channel_id, code), (ch_b, ErrorCode::PeerGone))
        }
        other => panic!("unexpected {other:?}"),
    }
    quiet(&mut alice, "alice after bob was denied").await;
    let files = issue(&w.ca, &w.dir, Role::Agent, "bob", &["ops"]);
    assert_eq!(refusal(&w, &files).await, Some(Refusal::IdentityDenied));

    // 4. alice's certificate serial is revoked: Revoked, live and at the next handshake.
    let alice_files = issue(&w.ca, &w.dir, Role::Agent, "alice", &["eng"]);
    let serial = ztna_core::tls::cert_serial(
        &rustls::pki_types::CertificateDer::from_pem_file(&alice_files.cert).unwrap(),
    )
    .unwrap();
    std::fs::write(
        &deny,
        format!(
            "identities = [\"bob\"]\nserials = [\"{}\"]\n",
            ztna_core::tls::format_serial(&serial)
        ),
    )
    .unwrap();
    ztna_relay::reload::reload_once(&w.relay, &cfg).unwrap();
    assert_eq!(
        closed_with(alice.connection()).await,
        u64::from(ErrorCode::Revoked.to_quic())
    );
    assert_eq!(refusal(&w, &alice_files).await, Some(Refusal::Revoked));
    assert_eq!(w.relay.metrics.sessions_revoked.load(Ordering::Relaxed), 2);
    w.server.abort();
}

/// The watch: a changed config file is reloaded without a signal; a broken one is refused and
/// counted, and the old policy stays.
#[tokio::test]
async fn policy_file_changes_are_reloaded() {
    let w = World::start().await;
    let file = w.dir.join("relay.json");
    let write = |cfg: &RelayConfig| {
        // Written whole and renamed, as an editor or a config manager does.
        let tmp = w.dir.join("relay.json.tmp");
        std::fs::write(&tmp, serde_json::to_string(cfg).unwrap()).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    let mut cfg = w.cfg.clone();
    cfg.reload_poll_secs = 1;
    write(&cfg);
    let load = {
        let file = file.clone();
        move || {
            let text = std::fs::read_to_string(&file)?;
            Ok(serde_json::from_str::<RelayConfig>(&text)?)
        }
    };
    let watcher = tokio::spawn(ztna_relay::reload::run(
        w.relay.clone(),
        vec![file.clone()],
        &cfg,
        load,
    ));
    let mut alice = w.agent("alice", &[]).await;
    let _conn1 = connector(&w, "conn1", vec![svc("echo", 1)]).await;
    match next(&mut alice).await {
        ControlMessage::Catalog(c) => assert_eq!(c.len(), 1),
        other => panic!("unexpected {other:?}"),
    }
    // eng loses echo in the file: the catalog empties within a few polls.
    cfg.access[0].identities = vec!["nobody".into()];
    cfg.access[0].groups.clear();
    write(&cfg);
    let started = tokio::time::Instant::now();
    match next(&mut alice).await {
        ControlMessage::Catalog(c) => assert!(c.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    eprintln!(
        "catalog withdrawn {:.2} s after the file changed",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(w.relay.metrics.policy_reloads.load(Ordering::Relaxed), 1);
    // A broken file is refused, counted, and changes nothing.
    std::fs::write(&file, "{ not json").unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while w.relay.metrics.policy_reload_errors.load(Ordering::Relaxed) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "broken file not seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w.relay.metrics.policy_reloads.load(Ordering::Relaxed), 1);
    assert!(w.relay.policy().service("echo").is_some());
    watcher.abort();
    w.server.abort();
}

/// A client with `files` that the relay refuses in the handshake: what it can learn from the
/// close (the TLS alert as a QUIC CRYPTO_ERROR, or an application code). `None` if it was let
/// in (the relay then closes it after 5 s for sending no hello).
async fn refusal(w: &World, files: &TlsFiles) -> Option<Refusal> {
    // Built by hand: `Credentials` refuses to load a certificate without a valid identity.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(&files.ca).unwrap())
        .unwrap();
    let chain = vec![rustls::pki_types::CertificateDer::from_pem_file(&files.cert).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    tls.alpn_protocols = vec![ALPN_RELAY.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport::outer(Timing::default()));
    ep.set_default_client_config(cfg);
    let classify = |e: &quinn::ConnectionError| match e {
        quinn::ConnectionError::ConnectionClosed(c) => {
            Refusal::from_quic_transport_code(u64::from(c.error_code))
        }
        quinn::ConnectionError::TransportError(t) => {
            Refusal::from_quic_transport_code(u64::from(t.code))
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            Refusal::from_app_code(c.error_code.into_inner())
        }
        _ => None,
    };
    // The server judges the client's certificate after the client's side of the handshake is
    // done, so the verdict may come as a close of an "established" connection.
    let r = match ep.connect(w.target.addr, "relay").unwrap().await {
        Err(e) => classify(&e),
        Ok(conn) => {
            let e = tokio::time::timeout(T, conn.closed())
                .await
                .expect("closed in time");
            classify(&e)
        }
    };
    ep.close(0u32.into(), b"");
    r
}

/// What a refused client can tell apart: unknown CA, expired, revoked (deny list or CRL) and
/// identity denied arrive as distinct TLS alerts.
#[tokio::test]
async fn refused_certificates_get_distinct_alerts() {
    let w = World::start().await;
    // Expired an hour ago.
    let now = time::OffsetDateTime::now_utc();
    let old =
        w.ca.issue_with_validity(
            Role::Agent,
            "olda",
            &["eng".into()],
            &[],
            pki::Validity {
                not_before: now - time::Duration::days(31),
                not_after: now - time::Duration::hours(1),
            },
        )
        .unwrap();
    let write = |name: &str, i: &pki::Issued| {
        pki::write_new(&w.dir.join(format!("{name}.pem")), &i.cert_pem, false).unwrap();
        pki::write_new(&w.dir.join(format!("{name}.key")), &i.key_pem, true).unwrap();
        TlsFiles {
            ca: w.dir.join("ca.pem"),
            cert: w.dir.join(format!("{name}.pem")),
            key: w.dir.join(format!("{name}.key")),
        }
    };
    let expired = write("olda", &old);
    assert_eq!(refusal(&w, &expired).await, Some(Refusal::Expired));

    // Another CA.
    let other = CertificateAuthority::generate("Other").unwrap();
    let mut foreign = write(
        "eve",
        &other
            .issue(Role::Agent, "eve", &["eng".into()], &[])
            .unwrap(),
    );
    foreign.ca = w.dir.join("ca.pem");
    assert_eq!(refusal(&w, &foreign).await, Some(Refusal::UnknownCa));

    // Revoked by a CRL (`pki crl`'s code path), then denied by name.
    let carol =
        w.ca.issue(Role::Agent, "carol", &["eng".into()], &[])
            .unwrap();
    let carol_files = write("carol", &carol);
    let crl = w.dir.join("ca.crl");
    std::fs::write(
        &crl,
        w.ca.crl(std::slice::from_ref(&carol.serial), 7).unwrap(),
    )
    .unwrap();
    let mut cfg = w.cfg.clone();
    cfg.crls = vec![crl];
    ztna_relay::reload::reload_once(&w.relay, &cfg).unwrap();
    assert_eq!(refusal(&w, &carol_files).await, Some(Refusal::Revoked));
    let dave = write(
        "dave",
        &w.ca
            .issue(Role::Agent, "dave", &["eng".into()], &[])
            .unwrap(),
    );
    let deny = w.dir.join("deny.toml");
    std::fs::write(&deny, "identities = [\"dave\"]\n").unwrap();
    cfg.deny_list = Some(deny);
    ztna_relay::reload::reload_once(&w.relay, &cfg).unwrap();
    assert_eq!(refusal(&w, &dave).await, Some(Refusal::IdentityDenied));
    // Everyone else still gets in.
    let s = w.agent("alice", &[]).await;
    assert!(s.welcome().tunnel_ip.is_some());
    // A CRL file that does not parse is refused and the old lists stay.
    let bad = w.dir.join("bad.crl");
    std::fs::write(
        &bad,
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    cfg.crls.push(bad);
    assert!(ztna_relay::reload::reload_once(&w.relay, &cfg).is_err());
    assert_eq!(refusal(&w, &carol_files).await, Some(Refusal::Revoked));
    w.server.abort();
}

/// A `Write` into a shared buffer, for capturing log output.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Issues an agent certificate with any subject name and groups, bypassing `pki issue`'s
/// checks, as a CA compromised into signing odd names (or an old CA) would.
fn issue_raw(w: &World, file: &str, cn: &str, groups: &[&str]) -> TlsFiles {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(w.dir.join("ca.pem.key")).unwrap())
            .unwrap();
    let ca_cert = rcgen::CertificateParams::from_ca_cert_pem(&w.ca.cert_pem())
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let mut sans = vec![rcgen::SanType::URI(
        "urn:ztna:role:agent".try_into().unwrap(),
    )];
    for g in groups {
        sans.push(rcgen::SanType::URI(
            format!("urn:ztna:group:{g}").try_into().unwrap(),
        ));
    }
    params.subject_alt_names = sans;
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(w.dir.join(format!("{file}.pem")), cert.pem()).unwrap();
    std::fs::write(w.dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    TlsFiles {
        ca: w.dir.join("ca.pem"),
        cert: w.dir.join(format!("{file}.pem")),
        key: w.dir.join(format!("{file}.key")),
    }
}

/// Names from the network are validated before they are used or logged: an identity or group
/// with control characters fails the handshake; a service name, a wanted name or a connector
/// name with them is refused with `Malformed`; and no line of the relay's log is forged (each
/// evil name carries "\nFORGED" to start a fake line).
#[tokio::test]
async fn names_with_control_characters_are_refused_and_never_logged_raw() {
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let evil = "x\u{1b}[31m\r\nFORGED line\u{7}";

    let w = World::start().await;
    std::fs::write(w.dir.join("ca.pem.key"), w.ca.key_pem()).unwrap();
    // Identity and group names.
    let bad_cn = issue_raw(&w, "badcn", evil, &["eng"]);
    assert_eq!(refusal(&w, &bad_cn).await, Some(Refusal::IdentityDenied));
    let bad_group = issue_raw(&w, "badgroup", "okname", &["eng\u{1b}[0m\nFORGED"]);
    assert_eq!(refusal(&w, &bad_group).await, Some(Refusal::IdentityDenied));
    // A service name.
    let c1 = connector(&w, "conn1", vec![svc(evil, 1), svc("echo", 1)]).await;
    let r = &c1.welcome().rejected;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].code, ErrorCode::Malformed);
    assert!(!r[0].name.chars().any(char::is_control), "{:?}", r[0].name);
    assert_eq!(c1.welcome().services.len(), 1);
    // A wanted name and a connector name.
    let mut alice = w.agent("alice", &["echo", evil]).await;
    let r = &alice.welcome().rejected;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].code, ErrorCode::Malformed);
    alice
        .send(ControlMessage::OpenChannel {
            request_id: 9,
            connector: evil.into(),
        })
        .unwrap();
    match next(&mut alice).await {
        ControlMessage::Error {
            code, request_id, ..
        } => assert_eq!((code, request_id), (ErrorCode::Malformed, Some(9))),
        other => panic!("unexpected {other:?}"),
    }
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("refused service") && text.contains("channel refused"),
        "the refusals were logged:\n{text}"
    );
    for line in text.lines() {
        assert!(!line.starts_with("FORGED"), "a forged log line:\n{text}");
    }
    assert!(
        !text.contains(['\u{1b}', '\r', '\u{7}']),
        "raw control characters in the log:\n{text:?}"
    );
    drop(c1);
    w.server.abort();
}

/// Issue 10, "an agent cannot disconnect a connector": a valid agent writes 2000
/// OpenChannel/ChannelClosed pairs (guessing the sequential channel ids) as fast as it can, and
/// reads nothing. On the old relay this filled the connector's 256-message queue and the relay
/// closed the *connector*. Now the connector stays up, hears only rate-limited offers and no
/// close of a channel it never accepted, and another agent's channel opens and forwards.
#[tokio::test]
async fn open_close_flood_does_not_disconnect_the_connector() {
    use std::sync::atomic::AtomicU64;
    let w = World::start().await;
    // A connector that behaves like the real one: it accepts every channel it is offered, and a
    // full send queue or a lost session counts as a disconnect.
    let cnode = w.node(Role::Connector, "conn1", &[]);
    let hello = Hello {
        role: Role::Connector,
        services: vec![svc("echo", 1)],
        want: vec![],
        software: "test".into(),
        tunnel_ip: None,
    };
    let mut conn1 = cnode.connect_relay(&w.target, hello).await.unwrap();
    #[derive(Default)]
    struct Seen {
        offers: AtomicU64,
        closes: AtomicU64,
        closes_unaccepted: AtomicU64,
        disconnects: AtomicU64,
    }
    let seen = Arc::new(Seen::default());
    let (bob_tx, mut bob_rx) = tokio::sync::mpsc::unbounded_channel();
    let seen2 = seen.clone();
    let connector = tokio::spawn(async move {
        let mut accepted = std::collections::HashSet::new();
        loop {
            match conn1.recv().await {
                Ok(ControlMessage::IncomingChannel {
                    channel_id, agent, ..
                }) => {
                    seen2.offers.fetch_add(1, Ordering::Relaxed);
                    if conn1
                        .send(ControlMessage::ChannelAccepted { channel_id })
                        .is_err()
                    {
                        seen2.disconnects.fetch_add(1, Ordering::Relaxed);
                        return conn1;
                    }
                    accepted.insert(channel_id);
                    let _ = bob_tx.send((agent, channel_id));
                }
                Ok(ControlMessage::ChannelClosed { channel_id, .. }) => {
                    seen2.closes.fetch_add(1, Ordering::Relaxed);
                    if !accepted.contains(&channel_id) {
                        seen2.closes_unaccepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    seen2.disconnects.fetch_add(1, Ordering::Relaxed);
                    return conn1;
                }
            }
        }
    });

    // Alice's channel, open before the flood; its id tells the attacker where ids are.
    let mut alice = w.agent("alice", &[]).await;
    assert_eq!(alice.welcome().services.len(), 1);
    alice
        .send(ControlMessage::OpenChannel {
            request_id: 1,
            connector: "conn1".into(),
        })
        .unwrap();
    let alice_ch = match next(&mut alice).await {
        ControlMessage::ChannelOpened { channel_id, .. } => channel_id,
        other => panic!("unexpected {other:?}"),
    };
    while bob_rx.try_recv().is_ok() {}
    let offers_before = seen.offers.load(Ordering::Relaxed);

    // Mallory: 2000 pairs in one write (46 KB), reading nothing.
    let (_ep, mconn, mut msend, _mrecv) = raw_client(&w, "mallory").await;
    let mut flood = ztna_proto::frame::encode(&ControlMessage::Hello(Hello {
        role: Role::Agent,
        services: vec![],
        want: vec![],
        software: "x".into(),
        tunnel_ip: None,
    }))
    .unwrap();
    for i in 0..2000u32 {
        let open = ControlMessage::OpenChannel {
            request_id: i,
            connector: "conn1".into(),
        };
        let close = ControlMessage::ChannelClosed {
            channel_id: alice_ch + 1 + i,
            code: ErrorCode::PeerGone,
        };
        flood.extend(ztna_proto::frame::encode(&open).unwrap());
        flood.extend(ztna_proto::frame::encode(&close).unwrap());
    }
    let flood_bytes = flood.len();
    let started = tokio::time::Instant::now();
    msend.write_all(&flood).await.unwrap();

    // While the flood is being worked through, Bob opens a channel and uses it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut bob = w.agent("bob", &[]).await;
    let t = tokio::time::Instant::now();
    bob.send(ControlMessage::OpenChannel {
        request_id: 1,
        connector: "conn1".into(),
    })
    .unwrap();
    let bob_ch = match next(&mut bob).await {
        ControlMessage::ChannelOpened { channel_id, .. } => channel_id,
        other => panic!("unexpected {other:?}"),
    };
    let bob_open_ms = t.elapsed().as_millis();
    let before = w.relay.metrics.datagrams_forwarded.load(Ordering::Relaxed);
    for (s, ch) in [(&bob, bob_ch), (&alice, alice_ch)] {
        let id = ChannelId::new(ch).unwrap();
        s.send_channel_data(id, b"opaque").unwrap();
    }
    let deadline = tokio::time::Instant::now() + T;
    while w.relay.metrics.datagrams_forwarded.load(Ordering::Relaxed) < before + 2 {
        assert!(tokio::time::Instant::now() < deadline, "not forwarded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give the flood 3 s in all, then count.
    tokio::time::sleep_until(started + Duration::from_secs(3)).await;
    let offers = seen.offers.load(Ordering::Relaxed) - offers_before - 1; // minus Bob's
    let closes = seen.closes.load(Ordering::Relaxed);
    let closes_unaccepted = seen.closes_unaccepted.load(Ordering::Relaxed);
    let disconnects = seen.disconnects.load(Ordering::Relaxed);
    let limited = w.relay.metrics.control_limited.load(Ordering::Relaxed);
    println!(
        "flood of {flood_bytes} bytes: connector disconnects {disconnects}, offers reaching it \
         {offers}, closes reaching it {closes} ({closes_unaccepted} of channels it never \
         accepted), requests limited {limited}, bob's channel opened \
         in {bob_open_ms} ms"
    );
    assert_eq!(disconnects, 0, "the connector was disconnected");
    assert_eq!(
        closes_unaccepted, 0,
        "closes of channels the connector never accepted"
    );
    assert!(closes <= offers, "{closes} closes for {offers} offers");
    // Burst 64 plus 16/s for 3 s.
    assert!(
        offers <= 64 + 16 * 3 + 4,
        "{offers} offers reached the connector"
    );
    assert!(bob_open_ms < 2000, "bob waited {bob_open_ms} ms");
    assert!(mconn.close_reason().is_none() || limited > 0);
    assert!(!connector.is_finished());
    connector.abort();
    w.server.abort();
}

/// Issue 13: channel data travels outside the outer connection, so the relay must check it by
/// address: forwarded only between the bound ends of an open channel; from a stranger (a valid
/// header and an open channel's number, from its own address), malformed, for an unknown
/// channel, or after the channel closed, it is dropped and counted, and the connector's socket
/// sees none of it.
#[tokio::test]
async fn channel_data_goes_only_between_the_bound_ends_of_an_open_channel() {
    let w = World::start().await;
    let mut conn1 = connector(&w, "conn1", vec![svc("echo", 1)]).await;
    let mut alice = agent_in(&w, "alice", &["eng"]).await;
    let (ch, _) = open_channel(&mut alice, &mut conn1, "conn1", 1).await;
    let id = ChannelId::new(ch).unwrap();
    conn1.attach_channel(id);
    let m = &w.relay.metrics;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let received = |s: &RelaySession| get(&s.mux().stats().relay_rx_packets);
    macro_rules! wait {
        ($what:expr, $done:expr) => {{
            let deadline = tokio::time::Instant::now() + T;
            while !$done {
                assert!(tokio::time::Instant::now() < deadline, "{}", $what);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }};
    }

    for _ in 0..5 {
        alice.send_channel_data(id, b"genuine").unwrap();
    }
    wait!(
        "genuine channel data forwarded",
        get(&m.datagrams_forwarded) >= 5 && received(&conn1) >= 5
    );
    let (forwarded, delivered) = (get(&m.datagrams_forwarded), received(&conn1));

    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..3 {
        stranger
            .send_to(&datagram::encode(id, b"spoofed"), w.target.addr)
            .await
            .unwrap();
    }
    stranger
        .send_to(&[datagram::TYPE, 0, 0], w.target.addr)
        .await
        .unwrap();
    alice
        .send_channel_data(ChannelId::new(ch + 1000).unwrap(), b"unknown")
        .unwrap();
    wait!(
        "strangers, malformed and unknown counted",
        get(&m.channel_dropped_unbound) >= 3
            && get(&m.channel_dropped_malformed) >= 1
            && get(&m.channel_dropped_unknown) >= 1
    );

    alice
        .send(ControlMessage::ChannelClosed {
            channel_id: ch,
            code: ErrorCode::PeerGone,
        })
        .unwrap();
    wait!(
        "channel closed at the relay",
        w.relay.forwarding_channels() == 0
    );
    let unknown = get(&m.channel_dropped_unknown);
    alice.send_channel_data(id, b"late").unwrap();
    wait!(
        "late channel data counted",
        get(&m.channel_dropped_unknown) > unknown
    );
    assert_eq!(
        get(&m.datagrams_forwarded),
        forwarded,
        "nothing else forwarded"
    );
    assert_eq!(
        received(&conn1),
        delivered,
        "the connector saw nothing else"
    );
}
