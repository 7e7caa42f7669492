//! Port prediction for hard NATs (the "birthday" traversal), as pure schedules with injected
//! time. No sockets here: the caller opens them, sends what [`HardOpener::poll`] and
//! [`EasyProber::poll`] say, and feeds back what arrives.
//!
//! **The problem.** A NAT with endpoint-dependent mapping (symmetric; the zoo's `sym` router)
//! gives every new destination a new, random external port. Its host's relay-observed address
//! is then useless to the peer: the peer's probes to it arrive at a port that maps nothing
//! toward the peer. When the *peer's* NAT filters by address and port (port-restricted, a bare
//! router, a cloud NAT gateway), the hard side's pings from their new ports are dropped there
//! too, so plain punching never meets.
//!
//! **Detection** ([`classify`]): the relay observes one socket twice, on its main port and on
//! a second port; two different ports on one address mean endpoint-dependent mapping. Each end
//! tells the other, and [`plan`] picks a role: both easy punch as usual, exactly one hard runs
//! this module, both hard stay on the relay (no amount of guessing meets two random ports).
//!
//! **The birthday approach.** The hard side opens [`HARD_SOCKETS`] extra sockets and sends one
//! opening probe from each toward the easy side's public address ([`HardOpener`]); its NAT
//! creates that many mappings toward exactly that address, on random ports. The easy side
//! probes random ports of the hard side's *advertised* public address ([`EasyProber`]), each
//! port at most once, at [`EASY_RATE`] a second and at most [`EASY_TOTAL`] in all, stopping at
//! the first confirmed pong. A probe to one of the mapped ports passes the hard NAT (it comes
//! from the address the mapping points at) and reaches one extra socket, which answers; that
//! socket becomes the direct path's socket and every other extra socket is closed at once.
//!
//! **The arithmetic** (the zoo's `sym` router picks from [`PORT_SPAN`] = 64 512 ports): each
//! probe hits one of k = 256 mappings with probability k / 64 512 = 1 / 252, so m probes miss
//! all of them with probability about (1 - 1/252)^m = e^(-m/252). The easy side starts
//! [`EASY_DELAY`] after the attempt so the hard side's first round of mappings exists (it takes
//! 0.25 s); in the 9.7 s left of a 10 s attempt it sends up to 1455 probes, and the attempt
//! fails with probability e^(-1455/252) ≈ 0.3 % (the median time to the hit is 0.3 s + 175
//! probes = 1.5 s). Ten tries then all succeed with probability 0.97, and at least 9 with
//! probability above 0.999. Both ends start an attempt [`START_AFTER`] after the peer's candidates
//! arrived, so plain punching wins first where the other side's NAT filters by address only
//! (a full cone or address-restricted NAT admits the hard side's new ports).
//! The budget is stated per attempt: the easy side at most [`EASY_TOTAL`] = 1500 small (71-byte)
//! probes at [`EASY_RATE`] = 150 a second (11 kB/s), all to the one advertised address; the hard
//! side [`HARD_SOCKETS`] = 256 low-TTL opening probes per round, [`HARD_ROUNDS`] rounds
//! [`HARD_REOPEN`] apart, all to the one advertised address of the easy side, each dying a few
//! hops out. [`tests::nine_of_ten_within_ten_seconds_against_a_random_port_nat`] checks the
//! arithmetic on a simulated router.
//!
//! **Not a weapon.** Only the port is predicted: the address is always the peer's advertised
//! reflexive address, and the caller keeps refusing refused networks before starting. Both
//! schedules are bounded in rate, in total, and in time ([`ATTEMPT`]).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Extra sockets (NAT mappings) the hard side opens.
pub const HARD_SOCKETS: usize = 256;
/// Opening rounds of the hard side: each extra socket sends this many opening probes.
pub const HARD_ROUNDS: u32 = 2;
/// Time between two opening rounds (refreshes mappings a lossy path may have missed).
pub const HARD_REOPEN: Duration = Duration::from_secs(4);
/// Most opening probes the hard side sends per second (one round takes 0.25 s).
pub const HARD_RATE: u32 = 1024;
/// Probes per second the easy side sends to guessed ports.
pub const EASY_RATE: u32 = 150;
/// Most probes the easy side sends in one attempt.
pub const EASY_TOTAL: u32 = 1500;
/// How long after the attempt starts the easy side begins (the hard side's mappings first).
pub const EASY_DELAY: Duration = Duration::from_millis(300);
/// How long after the peer's candidates arrived an attempt may start (plain punching first).
pub const START_AFTER: Duration = Duration::from_millis(500);
/// How long one attempt lasts; then the extra sockets are closed and the pair stays on the
/// relay (until a later attempt).
pub const ATTEMPT: Duration = Duration::from_secs(10);
/// The lowest port guessed (ports below are rarely used for NAT mappings).
pub const PORT_MIN: u16 = 1024;
/// How many ports are guessed from: `PORT_MIN..=65535`.
pub const PORT_SPAN: u32 = 65536 - PORT_MIN as u32;
/// Most probes sent at once when the caller polls late (the rest of the backlog is skipped).
const MAX_BURST: u32 = 10;

/// An end's NAT mapping behaviour, from two relay observations of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// The same address and port toward both relay ports (or not behind a NAT at all).
    Independent,
    /// Another port toward each destination: a hard NAT.
    Dependent,
    /// Not known (no second observation, or two public addresses).
    Unknown,
}

/// The mapping behaviour that two observations of one socket show: `main` through the
/// relay's main port, `second` through its second port.
pub fn classify(main: SocketAddr, second: SocketAddr) -> Mapping {
    if main.ip() != second.ip() {
        // A NAT with a pool of public addresses ("arbitrary" pooling): a guessed port
        // would also need a guessed address, which we never do.
        Mapping::Unknown
    } else if main.port() == second.port() {
        Mapping::Independent
    } else {
        Mapping::Dependent
    }
}

/// What a pair does about its NATs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Plain punching only (neither side is known to be hard).
    Punch,
    /// This end is hard and the peer easy: open many mappings ([`HardOpener`]).
    OpenMappings,
    /// This end is easy and the peer hard: probe many ports ([`EasyProber`]).
    GuessPorts,
    /// Both hard: stay on the relay (plain punching still runs; it costs little).
    Relay,
}

/// The role of this end, from its own mapping and the one the peer reported.
pub fn plan(own: Mapping, peer: Mapping) -> Plan {
    match (own, peer) {
        (Mapping::Dependent, Mapping::Dependent) => Plan::Relay,
        (Mapping::Dependent, Mapping::Independent) => Plan::OpenMappings,
        (Mapping::Independent, Mapping::Dependent) => Plan::GuessPorts,
        _ => Plan::Punch,
    }
}

/// What a connection knows when it decides whether to start an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptState {
    /// This end's mapping.
    pub own: Mapping,
    /// The peer's, from its reflexive candidate.
    pub peer: Mapping,
    /// A direct path is up (plain punching found one, or an earlier attempt did).
    pub direct_up: bool,
    /// An attempt is running, or one won and its socket carries the path.
    pub busy: bool,
    /// Since when the peer's candidates are known.
    pub peer_known_for: Option<Duration>,
    /// Since the last attempt started.
    pub since_last: Option<Duration>,
    /// The peer's advertised address is in a refused network.
    pub refused: bool,
}

/// Least time between two attempts of one connection.
pub const ATTEMPT_INTERVAL: Duration = Duration::from_secs(30);

/// The attempt to start now, if any: [`Plan::OpenMappings`] or [`Plan::GuessPorts`] when
/// exactly one end is hard, [`Plan::Relay`] (nothing to start, say so once) when both are;
/// only after plain punching had [`START_AFTER`], while no direct path is up, never toward a
/// refused network, and at most once per [`ATTEMPT_INTERVAL`].
pub fn attempt(s: AttemptState) -> Option<Plan> {
    let ready = !s.busy
        && !s.direct_up
        && s.peer_known_for.is_some_and(|d| d >= START_AFTER)
        && s.since_last.is_none_or(|d| d >= ATTEMPT_INTERVAL);
    match plan(s.own, s.peer) {
        Plan::Punch => None,
        Plan::OpenMappings | Plan::GuessPorts if s.refused => None,
        p => ready.then_some(p),
    }
}

/// A pacer that releases at most `rate` events a second on a fixed grid, at most `total` in
/// all, never more than [`MAX_BURST`] at once when polled late.
#[derive(Debug, Clone)]
struct Pacer {
    interval: Duration,
    next_at: Instant,
    sent: u32,
    total: u32,
}

impl Pacer {
    fn new(rate: u32, total: u32, start: Instant) -> Self {
        Self {
            interval: Duration::from_secs(1) / rate.max(1),
            next_at: start,
            sent: 0,
            total,
        }
    }

    /// How many events are due at `now` (and marks them released).
    fn due(&mut self, now: Instant) -> u32 {
        let mut n = 0;
        while self.sent < self.total && self.next_at <= now && n < MAX_BURST {
            n += 1;
            self.sent += 1;
            self.next_at += self.interval;
        }
        if self.next_at <= now {
            // Polled far too late: skip the backlog instead of bursting it out.
            self.next_at = now + self.interval;
        }
        n
    }

    fn next_deadline(&self) -> Option<Instant> {
        (self.sent < self.total).then_some(self.next_at)
    }
}

/// The hard side's schedule: which extra socket sends its opening probe when.
#[derive(Debug, Clone)]
pub struct HardOpener {
    sockets: usize,
    start: Instant,
    interval: Duration,
    /// The round being sent and the next socket in it.
    round: u32,
    next: usize,
    end: Instant,
    winner: Option<usize>,
}

impl HardOpener {
    /// An attempt with `sockets` extra sockets (at most [`HARD_SOCKETS`]) starting at `now`.
    pub fn new(sockets: usize, now: Instant) -> Self {
        Self {
            sockets: sockets.min(HARD_SOCKETS),
            start: now,
            interval: Duration::from_secs(1) / HARD_RATE,
            round: 0,
            next: 0,
            end: now + ATTEMPT,
            winner: None,
        }
    }

    /// When the next opening probe is due.
    fn due_at(&self) -> Option<Instant> {
        (self.round < HARD_ROUNDS && self.sockets > 0).then(|| {
            self.start
                + HARD_REOPEN * self.round
                + self.interval * u32::try_from(self.next).unwrap_or(u32::MAX)
        })
    }

    /// The extra sockets (by index) that send an opening probe now: each once per round,
    /// paced at [`HARD_RATE`] (at most [`MAX_BURST`] at once when polled late), rounds
    /// [`HARD_REOPEN`] apart; nothing once the attempt ended or a socket won.
    pub fn poll(&mut self, now: Instant) -> Vec<usize> {
        let mut out = Vec::new();
        if self.finished(now) {
            return out;
        }
        while let Some(at) = self.due_at() {
            if at > now || out.len() >= MAX_BURST as usize {
                break;
            }
            out.push(self.next);
            self.next += 1;
            if self.next == self.sockets {
                self.next = 0;
                self.round += 1;
            }
        }
        out
    }

    /// An authenticated ping from the peer arrived on extra socket `index`: it wins if none
    /// did yet. Returns the winner; every other extra socket is to be closed.
    pub fn on_ping(&mut self, index: usize, now: Instant) -> Option<usize> {
        if self.winner.is_none() && index < self.sockets && now < self.end {
            self.winner = Some(index);
        }
        self.winner
    }

    /// The socket that won, if any.
    pub fn winner(&self) -> Option<usize> {
        self.winner
    }

    /// Whether the attempt is over: a socket won or the time ran out (close all the losers).
    pub fn finished(&self, now: Instant) -> bool {
        self.winner.is_some() || now >= self.end
    }

    /// When to poll next.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.winner.is_some() {
            return None;
        }
        Some(self.due_at().map_or(self.end, |d| d.min(self.end)))
    }
}

/// The easy side's schedule: which ports of the hard side's advertised address to probe when.
#[derive(Debug, Clone)]
pub struct EasyProber {
    ip: IpAddr,
    skip: u16,
    /// The guessed ports are `PORT_MIN + (offset + i * step) mod PORT_SPAN`: every port once,
    /// in an order the hard side's NAT can't correlate with (its ports are random).
    offset: u32,
    step: u32,
    index: u32,
    pacer: Pacer,
    end: Instant,
    hit: Option<SocketAddr>,
}

impl EasyProber {
    /// An attempt against `peer`, the hard side's advertised reflexive address, starting at
    /// `now` (probes begin [`EASY_DELAY`] later). `seed` should be unpredictable.
    pub fn new(peer: SocketAddr, now: Instant, seed: u64) -> Self {
        let mut s = seed;
        let offset = (splitmix(&mut s) % u64::from(PORT_SPAN)) as u32;
        // A step coprime to the span (64 512 = 2^10 * 3^2 * 7) visits every port once.
        let mut step = (splitmix(&mut s) % u64::from(PORT_SPAN)) as u32 | 1;
        while step.is_multiple_of(3) || step.is_multiple_of(7) {
            step = (step + 2) % PORT_SPAN;
        }
        Self {
            ip: peer.ip(),
            skip: peer.port(),
            offset,
            step,
            index: 0,
            pacer: Pacer::new(EASY_RATE, EASY_TOTAL, now + EASY_DELAY),
            end: now + ATTEMPT,
            hit: None,
        }
    }

    fn next_port(&mut self) -> Option<u16> {
        while self.index < PORT_SPAN {
            let k = (u64::from(self.offset) + u64::from(self.index) * u64::from(self.step))
                % u64::from(PORT_SPAN);
            self.index += 1;
            let port = u16::try_from(u64::from(PORT_MIN) + k).ok()?;
            // The advertised port itself is probed by plain punching already.
            if port != self.skip {
                return Some(port);
            }
        }
        None
    }

    /// The addresses to probe now: always the advertised address, with a guessed port.
    pub fn poll(&mut self, now: Instant) -> Vec<SocketAddr> {
        if self.finished(now) {
            return Vec::new();
        }
        let n = self.pacer.due(now);
        let ip = self.ip;
        (0..n)
            .filter_map(|_| self.next_port())
            .map(|p| SocketAddr::new(ip, p))
            .collect()
    }

    /// A confirmed pong from `from`: the attempt is over if it is the peer's address (any
    /// port; the path itself is then confirmed by the path set). Returns whether it counted.
    pub fn on_pong(&mut self, from: SocketAddr, now: Instant) -> bool {
        if self.hit.is_none() && from.ip() == self.ip && now < self.end {
            self.hit = Some(from);
            return true;
        }
        false
    }

    /// The address that answered, if any.
    pub fn hit(&self) -> Option<SocketAddr> {
        self.hit
    }

    /// Probes sent so far.
    pub fn sent(&self) -> u32 {
        self.pacer.sent
    }

    /// Whether the attempt is over: a hit, the budget spent, or the time up.
    pub fn finished(&self, now: Instant) -> bool {
        self.hit.is_some() || now >= self.end || self.pacer.sent >= self.pacer.total
    }

    /// When to poll next.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.hit.is_some() {
            return None;
        }
        Some(
            self.pacer
                .next_deadline()
                .map_or(self.end, |d| d.min(self.end)),
        )
    }
}

/// SplitMix64: a small deterministic generator (the seed comes from the caller).
fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn two_observations_classify_the_mapping() {
        let a = addr("198.51.100.7:40000");
        assert_eq!(classify(a, a), Mapping::Independent);
        assert_eq!(classify(a, addr("198.51.100.7:40001")), Mapping::Dependent);
        assert_eq!(classify(a, addr("198.51.100.8:40000")), Mapping::Unknown);
    }

    #[test]
    fn exactly_one_hard_side_guesses_both_hard_stay_on_the_relay() {
        use Mapping::*;
        assert_eq!(plan(Dependent, Independent), Plan::OpenMappings);
        assert_eq!(plan(Independent, Dependent), Plan::GuessPorts);
        assert_eq!(plan(Dependent, Dependent), Plan::Relay);
        for (a, b) in [
            (Independent, Independent),
            (Unknown, Dependent),
            (Dependent, Unknown),
            (Unknown, Unknown),
        ] {
            assert_eq!(plan(a, b), Plan::Punch, "{a:?} {b:?}");
        }
    }

    #[test]
    fn attempts_start_after_plain_punching_had_its_chance_and_not_too_often() {
        use Mapping::*;
        let base = AttemptState {
            own: Dependent,
            peer: Independent,
            direct_up: false,
            busy: false,
            peer_known_for: Some(START_AFTER),
            since_last: None,
            refused: false,
        };
        assert_eq!(attempt(base), Some(Plan::OpenMappings));
        let easy = AttemptState {
            own: Independent,
            peer: Dependent,
            ..base
        };
        assert_eq!(attempt(easy), Some(Plan::GuessPorts));
        let both = AttemptState {
            peer: Dependent,
            ..base
        };
        assert_eq!(attempt(both), Some(Plan::Relay));
        for (why, s) in [
            (
                "plain punching found a path",
                AttemptState {
                    direct_up: true,
                    ..base
                },
            ),
            ("one is running", AttemptState { busy: true, ..base }),
            (
                "candidates just arrived",
                AttemptState {
                    peer_known_for: Some(START_AFTER / 2),
                    ..base
                },
            ),
            (
                "no candidates",
                AttemptState {
                    peer_known_for: None,
                    ..base
                },
            ),
            (
                "the last one was recent",
                AttemptState {
                    since_last: Some(ATTEMPT_INTERVAL / 2),
                    ..base
                },
            ),
            (
                "a refused network",
                AttemptState {
                    refused: true,
                    ..base
                },
            ),
            (
                "the peer's mapping is unknown",
                AttemptState {
                    peer: Unknown,
                    ..base
                },
            ),
            (
                "both easy",
                AttemptState {
                    own: Independent,
                    ..base
                },
            ),
        ] {
            assert_eq!(attempt(s), None, "{why}");
        }
        assert_eq!(
            attempt(AttemptState {
                since_last: Some(ATTEMPT_INTERVAL),
                ..base
            }),
            Some(Plan::OpenMappings)
        );
    }

    #[test]
    fn the_easy_side_probes_only_the_advertised_address_each_port_once_within_budget() {
        let t0 = Instant::now();
        let peer = addr("203.0.113.9:5000");
        let mut p = EasyProber::new(peer, t0, 42);
        assert!(p.poll(t0).is_empty(), "waits for the hard side's mappings");
        let mut seen = HashSet::new();
        let mut per_sec: HashMap<u64, u32> = HashMap::new();
        let mut now = t0;
        while now < t0 + ATTEMPT + Duration::from_secs(5) {
            for a in p.poll(now) {
                assert_eq!(a.ip(), peer.ip(), "only the port is guessed");
                assert_ne!(a.port(), peer.port());
                assert!(a.port() >= PORT_MIN);
                assert!(seen.insert(a.port()), "port {} twice", a.port());
                *per_sec
                    .entry((now - t0).as_millis() as u64 / 1000)
                    .or_default() += 1;
            }
            now += Duration::from_millis(3);
        }
        assert_eq!(seen.len() as u32, p.sent());
        assert!(p.sent() <= EASY_TOTAL);
        // 9.7 s at 150 a second.
        assert!((1440..=1456).contains(&p.sent()), "{}", p.sent());
        assert!(per_sec.values().all(|&n| n <= EASY_RATE), "{per_sec:?}");
        assert!(p.finished(now));
    }

    #[test]
    fn a_late_poll_sends_a_small_burst_and_skips_the_backlog() {
        let t0 = Instant::now();
        let mut p = EasyProber::new(addr("203.0.113.9:5000"), t0, 7);
        // Polled 3 s late: at most one burst, not 300 probes at once.
        let burst = p.poll(t0 + Duration::from_secs(3));
        assert_eq!(burst.len() as u32, MAX_BURST);
        assert!(p.poll(t0 + Duration::from_secs(3)).is_empty());
        assert_eq!(
            p.next_deadline(),
            Some(t0 + Duration::from_secs(3) + Duration::from_secs(1) / EASY_RATE)
        );
    }

    #[test]
    fn the_first_pong_from_the_peer_ends_the_easy_attempt_others_do_not() {
        let t0 = Instant::now();
        let mut p = EasyProber::new(addr("203.0.113.9:5000"), t0, 1);
        let t = t0 + Duration::from_secs(1);
        assert!(!p.poll(t).is_empty());
        assert!(
            !p.on_pong(addr("192.0.2.1:7000"), t),
            "not the peer's address"
        );
        assert!(p.on_pong(addr("203.0.113.9:31337"), t));
        assert!(!p.on_pong(addr("203.0.113.9:31338"), t), "only the first");
        assert_eq!(p.hit(), Some(addr("203.0.113.9:31337")));
        assert!(p.finished(t));
        assert!(p.poll(t + Duration::from_secs(1)).is_empty());
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn the_hard_side_opens_every_socket_per_round_then_stops() {
        let t0 = Instant::now();
        let mut h = HardOpener::new(HARD_SOCKETS, t0);
        let mut opened: Vec<(Duration, usize)> = Vec::new();
        let mut now = t0;
        while now < t0 + ATTEMPT + Duration::from_secs(1) {
            for i in h.poll(now) {
                opened.push((now - t0, i));
            }
            now += Duration::from_millis(1);
        }
        assert_eq!(opened.len(), HARD_SOCKETS * HARD_ROUNDS as usize);
        let first: HashSet<usize> = opened[..HARD_SOCKETS].iter().map(|o| o.1).collect();
        assert_eq!(first.len(), HARD_SOCKETS, "each socket once per round");
        // A round takes 0.25 s at HARD_RATE; the second starts HARD_REOPEN after the first.
        assert!(opened[HARD_SOCKETS - 1].0 <= Duration::from_millis(260));
        let second = opened[HARD_SOCKETS].0;
        assert!(
            second >= HARD_REOPEN && second <= HARD_REOPEN + Duration::from_millis(5),
            "{second:?}"
        );
        assert!(h.finished(now));
        assert_eq!(h.winner(), None);
    }

    #[test]
    fn the_first_socket_pinged_wins_and_the_attempt_ends() {
        let t0 = Instant::now();
        let mut h = HardOpener::new(HARD_SOCKETS, t0);
        let t = t0 + Duration::from_secs(2);
        let _ = h.poll(t);
        assert_eq!(h.on_ping(HARD_SOCKETS + 3, t), None, "no such socket");
        assert_eq!(h.on_ping(17, t), Some(17));
        assert_eq!(h.on_ping(18, t), Some(17));
        assert!(h.finished(t));
        assert!(h.poll(t + Duration::from_secs(5)).is_empty());
        assert_eq!(h.next_deadline(), None);
        let mut late = HardOpener::new(4, t0);
        assert_eq!(late.on_ping(1, t0 + ATTEMPT), None, "after the attempt");
    }

    /// A symmetric NAT that gives each new flow a random port from `PORT_MIN..=65535`, and a
    /// virtual clock: the hard side's openers create mappings toward the easy side, the easy
    /// side's guesses hit one or not. Seeds differ per try, as two real attempts would.
    fn simulated_attempt(seed: u64) -> Option<Duration> {
        let t0 = Instant::now();
        let mut rng = seed ^ 0x5eed;
        let hard_ip = addr("203.0.113.9:5000");
        let mut opener = HardOpener::new(HARD_SOCKETS, t0);
        let mut prober = EasyProber::new(hard_ip, t0, seed.wrapping_mul(31));
        // External port -> the extra socket that owns the mapping toward the easy side.
        let mut mapped: HashMap<u16, usize> = HashMap::new();
        let mut socket_port: HashMap<usize, u16> = HashMap::new();
        let one_way = Duration::from_millis(20);
        let mut now = t0;
        while now < t0 + ATTEMPT {
            for i in opener.poll(now) {
                socket_port.entry(i).or_insert_with(|| {
                    let p = (PORT_MIN as u64 + splitmix(&mut rng) % PORT_SPAN as u64) as u16;
                    mapped.insert(p, i);
                    p
                });
            }
            for a in prober.poll(now) {
                if let Some(&i) = mapped.get(&a.port()) {
                    let arrive = now + one_way;
                    if opener.on_ping(i, arrive) == Some(i) {
                        let back = arrive + one_way;
                        assert!(prober.on_pong(a, back));
                        return Some(back - t0);
                    }
                }
            }
            now += Duration::from_millis(5);
        }
        None
    }

    #[test]
    fn nine_of_ten_within_ten_seconds_against_a_random_port_nat() {
        // 200 simulated attempts: the arithmetic says 99.7 % succeed within 10 s.
        let times: Vec<Option<Duration>> = (0..200).map(simulated_attempt).collect();
        let ok: Vec<Duration> = times.iter().flatten().copied().collect();
        let rate = ok.len() as f64 / times.len() as f64;
        assert!(rate >= 0.93, "success rate {rate}");
        let mut sorted = ok.clone();
        sorted.sort();
        let median = sorted[sorted.len() / 2];
        assert!(
            median > Duration::from_millis(600) && median < Duration::from_secs(4),
            "median {median:?}"
        );
        eprintln!(
            "birthday: {} of {} simulated attempts within 10 s, median {median:?}, max {:?}",
            ok.len(),
            times.len(),
            sorted.last()
        );
        // Every window of ten tries (as the e2e runs them): at least 9 of 10 succeed in most.
        let windows = times.chunks(10).filter(|w| w.iter().flatten().count() >= 9);
        assert!(windows.count() >= 17, "of 20 windows");
    }
}
