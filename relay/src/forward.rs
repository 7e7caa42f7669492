//! The relay's forwarding table for channel data, pure (no I/O, no clock).
//!
//! The control plane writes it (a session's address when it says hello and whenever its outer
//! connection migrates, a channel when it opens or closes); the data plane reads it once per
//! packet. A packet is forwarded only when its channel is open and its source is the address
//! bound to one end of it; it then goes to the other end's address, unchanged (both ends use
//! the channel's one number). Everything else is a counted drop: see [`Drop`].
//!
//! A [`Mirror`] (the relay's XDP channel map, `crate::xdp`) can be given every change to the
//! open channels' ends, so that a copy of the table outside this process stays the same.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use ztna_proto::datagram;

/// Why channel data was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Too short for its header, or a channel id out of range.
    Malformed,
    /// No such channel (never opened, or closed).
    UnknownChannel,
    /// The channel is open, but the source is not the address of either end.
    UnboundSource,
}

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it, as it is, to this address.
    Forward(SocketAddr),
    /// Drop it and count why.
    Drop(Drop),
}

#[derive(Debug, Clone, Copy)]
struct End {
    session: u64,
    addr: SocketAddr,
}

#[derive(Debug, Clone, Copy)]
struct Ends {
    agent: End,
    connector: End,
}

#[derive(Debug, Default)]
struct Session {
    addr: Option<SocketAddr>,
    channels: HashSet<u32>,
}

/// A copy of the open channels' ends and of the sessions' addresses kept elsewhere (the XDP
/// program's maps), told every change.
pub trait Mirror: Send + Sync + std::fmt::Debug {
    /// Channel `ch` is open between these addresses (newly, or an end moved).
    fn set(&mut self, ch: u32, agent: SocketAddr, connector: SocketAddr);
    /// Channel `ch` is closed.
    fn remove(&mut self, ch: u32);
    /// A session is bound to `addr` now (the first one there).
    fn bind(&mut self, addr: SocketAddr);
    /// No session is bound to `addr` any more.
    fn unbind(&mut self, addr: SocketAddr);
}

/// Open channels and the addresses bound to their ends.
#[derive(Debug, Default)]
pub struct ForwardTable {
    channels: HashMap<u32, Ends>,
    sessions: HashMap<u64, Session>,
    /// Sessions bound to each address.
    addrs: HashMap<SocketAddr, u32>,
    mirror: Option<Box<dyn Mirror>>,
}

impl ForwardTable {
    /// Tells `mirror` every change from now on, starting with every open channel.
    pub fn set_mirror(&mut self, mut mirror: Box<dyn Mirror>) {
        for addr in self.addrs.keys() {
            mirror.bind(*addr);
        }
        for (ch, e) in &self.channels {
            mirror.set(*ch, e.agent.addr, e.connector.addr);
        }
        self.mirror = Some(mirror);
    }

    /// Takes the mirror back (the XDP program is detached).
    pub fn take_mirror(&mut self) -> Option<Box<dyn Mirror>> {
        self.mirror.take()
    }

    /// Binds session `session` to the address its outer connection comes from now (at hello,
    /// and again when the connection migrates): every channel of the session moves with it.
    pub fn bind_session(&mut self, session: u64, addr: SocketAddr) {
        let s = self.sessions.entry(session).or_default();
        if let Some(old) = s.addr.replace(addr) {
            unbind_addr(&mut self.addrs, old, &mut self.mirror);
        }
        let n = self.addrs.entry(addr).or_default();
        *n += 1;
        if *n == 1 {
            if let Some(m) = self.mirror.as_mut() {
                m.bind(addr);
            }
        }
        for ch in &s.channels {
            if let Some(e) = self.channels.get_mut(ch) {
                for end in [&mut e.agent, &mut e.connector] {
                    if end.session == session {
                        end.addr = addr;
                    }
                }
                if let Some(m) = self.mirror.as_mut() {
                    m.set(*ch, e.agent.addr, e.connector.addr);
                }
            }
        }
    }

    /// Opens channel `ch` between two bound sessions (replacing an earlier channel of that
    /// number). `false`: a session is not bound, nothing changed.
    pub fn open(&mut self, ch: u32, agent: u64, connector: u64) -> bool {
        let addr_of = |id| self.sessions.get(&id).and_then(|s| s.addr);
        let (Some(a), Some(c)) = (addr_of(agent), addr_of(connector)) else {
            return false;
        };
        self.close(ch);
        self.channels.insert(
            ch,
            Ends {
                agent: End {
                    session: agent,
                    addr: a,
                },
                connector: End {
                    session: connector,
                    addr: c,
                },
            },
        );
        for id in [agent, connector] {
            self.sessions.entry(id).or_default().channels.insert(ch);
        }
        if let Some(m) = self.mirror.as_mut() {
            m.set(ch, a, c);
        }
        true
    }

    /// Closes channel `ch`; its packets are dropped from now on.
    pub fn close(&mut self, ch: u32) {
        if let Some(e) = self.channels.remove(&ch) {
            for id in [e.agent.session, e.connector.session] {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.channels.remove(&ch);
                }
            }
            if let Some(m) = self.mirror.as_mut() {
                m.remove(ch);
            }
        }
    }

    /// Forgets session `session` and closes every channel it is an end of.
    pub fn remove_session(&mut self, session: u64) {
        if let Some(s) = self.sessions.remove(&session) {
            if let Some(a) = s.addr {
                unbind_addr(&mut self.addrs, a, &mut self.mirror);
            }
            for ch in s.channels {
                self.close(ch);
            }
        }
    }

    /// Whether some session is bound to `addr`: a QUIC packet of an established connection
    /// from any other address means a session may have migrated.
    pub fn is_bound(&self, addr: SocketAddr) -> bool {
        self.addrs.contains_key(&addr)
    }

    /// The address session `session` is bound to.
    pub fn session_addr(&self, session: u64) -> Option<SocketAddr> {
        self.sessions.get(&session).and_then(|s| s.addr)
    }

    /// Channels open.
    pub fn channels_len(&self) -> usize {
        self.channels.len()
    }

    /// Sessions bound.
    pub fn sessions_len(&self) -> usize {
        self.sessions.len()
    }

    /// Where channel data `pkt` from `src` goes: one lookup.
    pub fn route(&self, src: SocketAddr, pkt: &[u8]) -> Verdict {
        let Ok((ch, _)) = datagram::decode(pkt) else {
            return Verdict::Drop(Drop::Malformed);
        };
        let Some(e) = self.channels.get(&ch.get()) else {
            return Verdict::Drop(Drop::UnknownChannel);
        };
        // Both ends behind one address and port could only be one socket talking to itself.
        if e.agent.addr == e.connector.addr {
            return Verdict::Drop(Drop::UnboundSource);
        }
        if src == e.agent.addr {
            Verdict::Forward(e.connector.addr)
        } else if src == e.connector.addr {
            Verdict::Forward(e.agent.addr)
        } else {
            Verdict::Drop(Drop::UnboundSource)
        }
    }
}

fn unbind_addr(
    addrs: &mut HashMap<SocketAddr, u32>,
    addr: SocketAddr,
    mirror: &mut Option<Box<dyn Mirror>>,
) {
    if let Some(n) = addrs.get_mut(&addr) {
        *n -= 1;
        if *n == 0 {
            addrs.remove(&addr);
            if let Some(m) = mirror.as_mut() {
                m.unbind(addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use ztna_proto::ChannelId;

    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pkt(ch: u32) -> Vec<u8> {
        datagram::encode(ChannelId::new(ch).unwrap(), b"inner")
    }

    fn table() -> ForwardTable {
        let mut t = ForwardTable::default();
        t.bind_session(1, a("198.51.100.1:4000"));
        t.bind_session(2, a("203.0.113.2:5000"));
        assert!(t.open(7, 1, 2));
        t
    }

    #[test]
    fn forwards_between_the_bound_ends_only() {
        let t = table();
        assert_eq!(
            t.route(a("198.51.100.1:4000"), &pkt(7)),
            Verdict::Forward(a("203.0.113.2:5000"))
        );
        assert_eq!(
            t.route(a("203.0.113.2:5000"), &pkt(7)),
            Verdict::Forward(a("198.51.100.1:4000"))
        );
        // Another port of the same host, another host, another channel, garbage.
        assert_eq!(
            t.route(a("198.51.100.1:4001"), &pkt(7)),
            Verdict::Drop(Drop::UnboundSource)
        );
        assert_eq!(
            t.route(a("192.0.2.9:4000"), &pkt(7)),
            Verdict::Drop(Drop::UnboundSource)
        );
        assert_eq!(
            t.route(a("198.51.100.1:4000"), &pkt(8)),
            Verdict::Drop(Drop::UnknownChannel)
        );
        assert_eq!(
            t.route(a("198.51.100.1:4000"), &[datagram::TYPE, 0]),
            Verdict::Drop(Drop::Malformed)
        );
    }

    #[test]
    fn a_closed_channel_and_an_ended_session_forward_nothing() {
        let mut t = table();
        t.close(7);
        assert_eq!(
            t.route(a("198.51.100.1:4000"), &pkt(7)),
            Verdict::Drop(Drop::UnknownChannel)
        );
        assert!(t.open(7, 1, 2));
        assert!(t.open(9, 1, 2));
        t.remove_session(2);
        assert_eq!(t.channels_len(), 0);
        assert_eq!(
            t.route(a("198.51.100.1:4000"), &pkt(9)),
            Verdict::Drop(Drop::UnknownChannel)
        );
        // A channel to an unbound session is not opened.
        assert!(!t.open(10, 1, 2));
        assert_eq!(t.channels_len(), 0);
    }

    #[test]
    fn a_migrated_session_takes_its_channels_along() {
        let mut t = table();
        t.bind_session(1, a("198.51.100.77:6000"));
        assert_eq!(
            t.route(a("198.51.100.1:4000"), &pkt(7)),
            Verdict::Drop(Drop::UnboundSource),
            "the old address no longer speaks for the agent"
        );
        assert_eq!(
            t.route(a("198.51.100.77:6000"), &pkt(7)),
            Verdict::Forward(a("203.0.113.2:5000"))
        );
        assert_eq!(
            t.route(a("203.0.113.2:5000"), &pkt(7)),
            Verdict::Forward(a("198.51.100.77:6000"))
        );
    }

    #[test]
    fn both_ends_at_one_address_forward_nothing() {
        let mut t = ForwardTable::default();
        t.bind_session(1, a("198.51.100.1:4000"));
        t.bind_session(2, a("198.51.100.1:4000"));
        assert!(t.open(3, 1, 2));
        assert_eq!(
            t.route(a("198.51.100.1:4000"), &pkt(3)),
            Verdict::Drop(Drop::UnboundSource)
        );
    }

    type Channels = HashMap<u32, (SocketAddr, SocketAddr)>;

    /// A mirror that records what it is told.
    #[derive(Debug, Default, Clone)]
    struct Recorder(
        std::sync::Arc<std::sync::Mutex<Channels>>,
        std::sync::Arc<std::sync::Mutex<HashSet<SocketAddr>>>,
    );

    impl Mirror for Recorder {
        fn set(&mut self, ch: u32, agent: SocketAddr, connector: SocketAddr) {
            self.0.lock().unwrap().insert(ch, (agent, connector));
        }
        fn remove(&mut self, ch: u32) {
            self.0.lock().unwrap().remove(&ch);
        }
        fn bind(&mut self, addr: SocketAddr) {
            assert!(self.1.lock().unwrap().insert(addr), "bound twice: {addr}");
        }
        fn unbind(&mut self, addr: SocketAddr) {
            assert!(
                self.1.lock().unwrap().remove(&addr),
                "unbound, not bound: {addr}"
            );
        }
    }

    #[test]
    fn a_mirror_starts_with_the_open_channels_and_follows_every_change() {
        let mut t = table();
        let rec = Recorder::default();
        t.set_mirror(Box::new(rec.clone()));
        let get = |ch| rec.0.lock().unwrap().get(&ch).copied();
        assert_eq!(
            get(7),
            Some((a("198.51.100.1:4000"), a("203.0.113.2:5000")))
        );
        t.bind_session(2, a("203.0.113.2:5001"));
        assert_eq!(
            get(7),
            Some((a("198.51.100.1:4000"), a("203.0.113.2:5001")))
        );
        t.remove_session(1);
        assert_eq!(get(7), None);
        assert!(t.take_mirror().is_some());
    }

    proptest! {
        /// Whatever the sequence of control-plane changes, a packet is forwarded only from an
        /// end's current address of an open channel, to the other end's, and the indexes agree.
        #[test]
        fn forwards_only_what_the_control_plane_opened(
            ops in proptest::collection::vec((0u8..5, 0u64..4, 0u64..4, 0u32..4, 0u16..3), 0..60),
            probe in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            let mut t = ForwardTable::default();
            let rec = Recorder::default();
            t.set_mirror(Box::new(rec.clone()));
            let mut model: HashMap<u32, (u64, u64)> = HashMap::new();
            let mut addrs: HashMap<u64, SocketAddr> = HashMap::new();
            for (op, s1, s2, ch, port) in ops {
                let addr = SocketAddr::from(([10, 0, 0, s1 as u8], 1000 + port));
                match op {
                    0 | 1 => { t.bind_session(s1, addr); addrs.insert(s1, addr); }
                    2 => {
                        let ok = t.open(ch, s1, s2);
                        prop_assert_eq!(ok, addrs.contains_key(&s1) && addrs.contains_key(&s2));
                        if ok { model.insert(ch, (s1, s2)); }
                    }
                    3 => { t.close(ch); model.remove(&ch); }
                    _ => {
                        t.remove_session(s1);
                        addrs.remove(&s1);
                        model.retain(|_, (x, y)| *x != s1 && *y != s1);
                    }
                }
            }
            prop_assert_eq!(t.channels_len(), model.len());
            // The mirror holds exactly the open channels and their ends' current addresses.
            let mirrored = rec.0.lock().unwrap().clone();
            let want: HashMap<u32, (SocketAddr, SocketAddr)> =
                model.iter().map(|(ch, (x, y))| (*ch, (addrs[x], addrs[y]))).collect();
            prop_assert_eq!(mirrored, want);
            let bound = rec.1.lock().unwrap().clone();
            prop_assert_eq!(bound, addrs.values().copied().collect::<HashSet<_>>());
            for a in addrs.values() {
                prop_assert!(t.is_bound(*a));
            }
            prop_assert_eq!(t.addrs.values().map(|n| *n as usize).sum::<usize>(), addrs.len());
            for ch in 0u32..4 {
                for src in addrs.values().copied().chain([SocketAddr::from(([10, 9, 9, 9], 1))]) {
                    let got = t.route(src, &pkt(ch));
                    let want = match model.get(&ch) {
                        None => Verdict::Drop(Drop::UnknownChannel),
                        Some((x, y)) => {
                            let (ax, ay) = (addrs[x], addrs[y]);
                            if ax == ay { Verdict::Drop(Drop::UnboundSource) }
                            else if src == ax { Verdict::Forward(ay) }
                            else if src == ay { Verdict::Forward(ax) }
                            else { Verdict::Drop(Drop::UnboundSource) }
                        }
                    };
                    prop_assert_eq!(got, want);
                }
            }
            // Arbitrary bytes never panic.
            let _ = t.route(SocketAddr::from(([10, 0, 0, 1], 1000)), &probe);
        }
    }
}
