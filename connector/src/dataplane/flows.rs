//! Pure flow table of the data plane: flows keyed by agent and addresses, an idle timeout and a
//! per-agent cap, with time passed in (`now`) rather than read. Generic over the flow's handle,
//! so the shell stores sockets in it and tests store plain values.
//!
//! Semantics, exactly:
//! - A flow is *live* while `now < last_active + idle_timeout`; at `now == last_active +
//!   idle_timeout` it has expired. Expired flows behave as absent for lookups even before
//!   [`FlowTable::expire`] removes them.
//! - An agent never holds more than `max_flows_per_agent` flows (live or expired-but-unswept).
//!   When it is at the cap, opening a flow first removes that agent's expired flows; if all are
//!   live, the new flow is refused. Live flows are never evicted.
//! - Every removal hands the handles back to the caller, who closes them and counts them.
//! - A flow is also active at the time its handle's [`Activity`] last recorded: a flow's reply
//!   task records each reply there without taking the table (or its lock), and the table reads
//!   it when it decides expiry.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// The origin of [`Activity`] stamps.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// When a flow was last active, recorded by its reply path without the table's lock: one atomic
/// per flow, shared between the table's handle and the task (or fast path) that serves it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Activity(Arc<AtomicU64>);

impl Activity {
    /// Records activity at `now` (never moving the stamp backwards).
    pub(crate) fn touch(&self, now: Instant) {
        let since = now.saturating_duration_since(*EPOCH).as_nanos();
        // 0 means never; a stamp is the nanoseconds since EPOCH plus one.
        let stamp = u64::try_from(since).unwrap_or(u64::MAX - 1) + 1;
        self.0.fetch_max(stamp, Ordering::Relaxed);
    }

    /// The last recorded activity, if any.
    fn last(&self) -> Option<Instant> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            stamp => Some(*EPOCH + Duration::from_nanos(stamp - 1)),
        }
    }

    /// Starts the clock the stamps count from; call before the first `now` is taken, so that
    /// no `now` lies before it.
    pub(crate) fn start_clock() {
        LazyLock::force(&EPOCH);
    }
}

/// What the table needs of a flow's handle: the activity its reply path records, if it has one.
pub(crate) trait Handle {
    /// The flow's activity stamp; `None` if only the table's own lookups mark it active.
    fn activity(&self) -> Option<&Activity> {
        None
    }
}

/// What identifies a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum FlowKey {
    /// A UDP flow: agent, agent's source port, service address, destination port.
    Udp {
        /// Agent id.
        agent: u64,
        /// Agent's source port.
        agent_port: u16,
        /// Service address.
        service: IpAddr,
        /// Destination port on the service.
        port: u16,
    },
    /// An ICMP echo flow: agent, the agent's echo identifier, service address.
    Echo {
        /// Agent id.
        agent: u64,
        /// The agent's echo identifier.
        ident: u16,
        /// Service address.
        service: IpAddr,
    },
}

impl FlowKey {
    /// The agent the flow belongs to.
    pub(crate) fn agent(&self) -> u64 {
        match *self {
            FlowKey::Udp { agent, .. } | FlowKey::Echo { agent, .. } => agent,
        }
    }
}

/// Distinguishes successive flows under the same key, so a stale task can't touch or remove its
/// successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowId(u64);

/// Why [`FlowTable::insert_with`] did not insert.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InsertError<E> {
    /// A live flow already has this key.
    Exists,
    /// The agent already has the maximum number of live flows.
    AgentFull,
    /// The handle could not be made.
    Make(E),
}

/// One flow.
struct Entry<H> {
    id: FlowId,
    /// When the table last saw the flow active (opened, looked up, touched).
    last_active: Instant,
    handle: H,
}

impl<H: Handle> Entry<H> {
    /// The flow's last activity: the table's own record or its handle's, the later.
    fn last_active(&self) -> Instant {
        match self.handle.activity().and_then(Activity::last) {
            Some(t) => t.max(self.last_active),
            None => self.last_active,
        }
    }
}

/// Flows with an idle timeout and a per-agent cap. See the module documentation.
pub(crate) struct FlowTable<H> {
    idle_timeout: Duration,
    max_per_agent: usize,
    flows: HashMap<FlowKey, Entry<H>>,
    by_agent: HashMap<u64, HashSet<FlowKey>>,
    next_id: u64,
}

impl<H: Handle> FlowTable<H> {
    /// An empty table. A zero `max_per_agent` refuses every flow.
    pub(crate) fn new(idle_timeout: Duration, max_per_agent: usize) -> Self {
        Self {
            idle_timeout,
            max_per_agent,
            flows: HashMap::new(),
            by_agent: HashMap::new(),
            next_id: 0,
        }
    }

    fn is_expired(&self, e: &Entry<H>, now: Instant) -> bool {
        now.saturating_duration_since(e.last_active()) >= self.idle_timeout
    }

    /// The live flow under `key`, marked active at `now`.
    pub(crate) fn get_mut(&mut self, key: &FlowKey, now: Instant) -> Option<(FlowId, &mut H)> {
        let timeout = self.idle_timeout;
        let e = self.flows.get_mut(key)?;
        if now.saturating_duration_since(e.last_active()) >= timeout {
            return None;
        }
        e.last_active = e.last_active.max(now);
        Some((e.id, &mut e.handle))
    }

    /// The flow `id` under `key`, live or not, without marking it active.
    pub(crate) fn peek(&self, key: &FlowKey, id: FlowId) -> Option<&H> {
        self.flows
            .get(key)
            .filter(|e| e.id == id)
            .map(|e| &e.handle)
    }

    /// Marks flow `id` under `key` active at `now`, if it is still live. Returns whether it was.
    /// (The data plane's reply paths record activity through the flow's [`Activity`] instead.)
    #[cfg(test)]
    pub(crate) fn touch(&mut self, key: &FlowKey, id: FlowId, now: Instant) -> bool {
        let timeout = self.idle_timeout;
        match self.flows.get_mut(key) {
            Some(e) if e.id == id && now.saturating_duration_since(e.last_active()) < timeout => {
                e.last_active = e.last_active.max(now);
                true
            }
            _ => false,
        }
    }

    /// Opens a flow under `key` at `now` with the handle `make` returns for its id.
    ///
    /// An expired flow under the same key is removed first; if the agent is at the cap, all its
    /// expired flows are removed. Removed flows are pushed to `closed` (even when the insert
    /// then fails). Refuses with [`InsertError::Exists`] if a live flow has the key, and with
    /// [`InsertError::AgentFull`] if the agent is still at the cap; `make` is not called then.
    pub(crate) fn insert_with<E>(
        &mut self,
        key: FlowKey,
        now: Instant,
        closed: &mut Vec<(FlowKey, H)>,
        make: impl FnOnce(FlowId) -> Result<H, E>,
    ) -> Result<FlowId, InsertError<E>> {
        if let Some(e) = self.flows.get(&key) {
            if !self.is_expired(e, now) {
                return Err(InsertError::Exists);
            }
            if let Some(h) = self.remove_key(&key) {
                closed.push((key, h));
            }
        }
        let agent = key.agent();
        if self.agent_len(agent) >= self.max_per_agent {
            let expired: Vec<FlowKey> = self
                .by_agent
                .get(&agent)
                .into_iter()
                .flatten()
                .filter(|k| self.flows.get(k).is_some_and(|e| self.is_expired(e, now)))
                .copied()
                .collect();
            for k in expired {
                if let Some(h) = self.remove_key(&k) {
                    closed.push((k, h));
                }
            }
            if self.agent_len(agent) >= self.max_per_agent {
                return Err(InsertError::AgentFull);
            }
        }
        let id = FlowId(self.next_id);
        let handle = make(id).map_err(InsertError::Make)?;
        self.next_id += 1;
        self.flows.insert(
            key,
            Entry {
                id,
                last_active: now,
                handle,
            },
        );
        self.by_agent.entry(agent).or_default().insert(key);
        Ok(id)
    }

    fn remove_key(&mut self, key: &FlowKey) -> Option<H> {
        let e = self.flows.remove(key)?;
        let agent = key.agent();
        if let Some(keys) = self.by_agent.get_mut(&agent) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_agent.remove(&agent);
            }
        }
        Some(e.handle)
    }

    /// Removes flow `id` under `key`, if that is still the flow there.
    pub(crate) fn remove(&mut self, key: &FlowKey, id: FlowId) -> Option<H> {
        if self.flows.get(key)?.id != id {
            return None;
        }
        self.remove_key(key)
    }

    /// Removes every flow of `agent`.
    pub(crate) fn remove_agent(&mut self, agent: u64) -> Vec<(FlowKey, H)> {
        let keys = self.by_agent.remove(&agent).unwrap_or_default();
        keys.into_iter()
            .filter_map(|k| self.flows.remove(&k).map(|e| (k, e.handle)))
            .collect()
    }

    /// Removes every flow that has expired at `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<(FlowKey, H)> {
        let expired: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, e)| self.is_expired(e, now))
            .map(|(k, _)| *k)
            .collect();
        expired
            .into_iter()
            .filter_map(|k| self.remove_key(&k).map(|h| (k, h)))
            .collect()
    }

    /// Number of flows (live or expired but not yet removed).
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Number of flows of `agent` (live or expired but not yet removed).
    pub(crate) fn agent_len(&self, agent: u64) -> usize {
        self.by_agent.get(&agent).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const SVC: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 100, 0, 1));
    const TIMEOUT: Duration = Duration::from_millis(100);

    impl Handle for &'static str {}
    impl Handle for () {}
    impl Handle for FlowId {}

    /// A handle with an activity stamp, as the data plane's flows have.
    struct Stamped(Activity);

    impl Handle for Stamped {
        fn activity(&self) -> Option<&Activity> {
            Some(&self.0)
        }
    }

    #[test]
    fn activity_recorded_outside_the_table_keeps_a_flow_alive() {
        Activity::start_clock();
        let t0 = Instant::now();
        let ns = Duration::from_nanos(1);
        let mut t = FlowTable::new(TIMEOUT, 10);
        let activity = Activity::default();
        let mut closed = Vec::new();
        let id = t
            .insert_with(key(1, 1), t0, &mut closed, |_| {
                Ok::<_, ()>(Stamped(activity.clone()))
            })
            .expect("insert");
        // The reply path records activity at T/2, without the table; a stamp never goes back.
        activity.touch(t0 + TIMEOUT / 2);
        activity.touch(t0);
        assert!(t.expire(t0 + TIMEOUT).is_empty(), "kept alive by its stamp");
        assert!(t.get_mut(&key(1, 1), t0 + TIMEOUT).is_some());
        // The lookup at T moved the table's own record past the stamp.
        assert!(t.expire(t0 + 2 * TIMEOUT - ns).is_empty());
        activity.touch(t0 + TIMEOUT + TIMEOUT / 2);
        assert!(t.expire(t0 + 2 * TIMEOUT).is_empty());
        let gone = t.expire(t0 + TIMEOUT + TIMEOUT / 2 + TIMEOUT);
        assert_eq!(gone.len(), 1);
        assert!(t.peek(&key(1, 1), id).is_none());
    }

    fn key(agent: u64, port: u16) -> FlowKey {
        FlowKey::Udp {
            agent,
            agent_port: port,
            service: SVC,
            port: 53,
        }
    }

    fn ok(h: &'static str) -> impl FnOnce(FlowId) -> Result<&'static str, ()> {
        move |_| Ok(h)
    }

    #[test]
    fn expiry_is_exact_at_the_boundary() {
        let t0 = Instant::now();
        let ns = Duration::from_nanos(1);
        let mut t = FlowTable::new(TIMEOUT, 10);
        let mut closed = Vec::new();
        let a = t
            .insert_with(key(1, 1), t0, &mut closed, ok("a"))
            .expect("a");
        let b = t
            .insert_with(key(1, 2), t0, &mut closed, ok("b"))
            .expect("b");

        // "a" is live up to one nanosecond before the timeout, and expired exactly at it.
        assert!(t.expire(t0 + TIMEOUT - ns).is_empty());
        assert!(t.touch(&key(1, 2), b, t0 + TIMEOUT / 2)); // keeps "b" alive
        assert!(
            t.get_mut(&key(1, 1), t0 + TIMEOUT).is_none(),
            "expired exactly"
        );
        assert!(!t.touch(&key(1, 1), a, t0 + TIMEOUT));
        assert_eq!(t.len(), 2, "lookups don't remove");
        assert!(t.peek(&key(1, 1), a).is_some());
        assert_eq!(t.expire(t0 + TIMEOUT), vec![(key(1, 1), "a")]);

        // "b" was refreshed at t0 + T/2; a lookup at t0 + T refreshes it again, and a touch
        // with an earlier `now` does not move it backwards.
        assert!(t.get_mut(&key(1, 2), t0 + TIMEOUT).is_some());
        assert!(t.touch(&key(1, 2), b, t0));
        assert!(t.expire(t0 + 2 * TIMEOUT - ns).is_empty());
        assert_eq!(t.expire(t0 + 2 * TIMEOUT), vec![(key(1, 2), "b")]);
        assert_eq!((t.len(), t.agent_len(1)), (0, 0));
    }

    #[test]
    fn cap_refuses_then_reuses_expired_room() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(TIMEOUT, 2);
        let mut closed = Vec::new();
        t.insert_with(key(1, 1), t0, &mut closed, ok("a"))
            .expect("a");
        t.insert_with(key(1, 2), t0 + TIMEOUT / 2, &mut closed, ok("b"))
            .expect("b");
        assert_eq!(
            t.insert_with(key(1, 3), t0, &mut closed, ok("c")),
            Err(InsertError::AgentFull)
        );
        // Other agents are unaffected.
        t.insert_with(key(2, 1), t0, &mut closed, ok("x"))
            .expect("x");
        // Once "a" has expired there is room, and inserting removes it.
        t.insert_with(key(1, 3), t0 + TIMEOUT, &mut closed, ok("c"))
            .expect("c");
        assert_eq!(closed, vec![(key(1, 1), "a")]);
        assert_eq!(t.agent_len(1), 2);
        // A live key can't be inserted twice; an expired one is replaced.
        let mut closed = Vec::new();
        assert_eq!(
            t.insert_with(key(1, 2), t0 + TIMEOUT, &mut closed, ok("b2")),
            Err(InsertError::Exists)
        );
        let later = t0 + TIMEOUT / 2 + TIMEOUT;
        t.insert_with(key(1, 2), later, &mut closed, ok("b2"))
            .expect("b2");
        assert_eq!(closed, vec![(key(1, 2), "b")]);
        // A failed make inserts nothing.
        assert_eq!(
            t.insert_with(key(3, 1), t0, &mut closed, |_| Err::<&str, _>("no socket")),
            Err(InsertError::Make("no socket"))
        );
        assert_eq!(t.agent_len(3), 0);
    }

    #[test]
    fn ids_guard_against_stale_removal() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(TIMEOUT, 4);
        let mut closed = Vec::new();
        let old = t
            .insert_with(key(1, 1), t0, &mut closed, ok("old"))
            .expect("old");
        let new = t
            .insert_with(key(1, 1), t0 + TIMEOUT, &mut closed, ok("new"))
            .expect("new");
        assert_ne!(old, new);
        assert_eq!(t.remove(&key(1, 1), old), None);
        assert!(!t.touch(&key(1, 1), old, t0 + TIMEOUT));
        assert_eq!(t.remove(&key(1, 1), new), Some("new"));
    }

    #[test]
    fn remove_agent() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(TIMEOUT, 4);
        let mut closed = Vec::new();
        for p in 1..=3 {
            t.insert_with(key(1, p), t0, &mut closed, ok("a"))
                .expect("a");
        }
        let echo = FlowKey::Echo {
            agent: 1,
            ident: 7,
            service: SVC,
        };
        t.insert_with(echo, t0, &mut closed, ok("e")).expect("e");
        t.insert_with(key(2, 1), t0, &mut closed, ok("b"))
            .expect("b");
        assert_eq!(t.remove_agent(1).len(), 4);
        assert_eq!((t.len(), t.agent_len(1), t.agent_len(2)), (1, 0, 1));
        assert_eq!(t.remove_agent(1).len(), 0);
    }

    #[test]
    fn zero_cap_refuses_everything() {
        let mut t = FlowTable::<()>::new(TIMEOUT, 0);
        assert_eq!(
            t.insert_with(key(1, 1), Instant::now(), &mut Vec::new(), |_| Ok::<_, ()>(
                ()
            )),
            Err(InsertError::AgentFull)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u16),
        InsertFailing(u64, u16),
        Get(u64, u16),
        Touch(u64, u16),
        Advance(u64),
        Expire,
        RemoveAgent(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let agent = 0..3u64;
        let port = 0..6u16;
        prop_oneof![
            4 => (agent.clone(), port.clone()).prop_map(|(a, p)| Op::Insert(a, p)),
            1 => (agent.clone(), port.clone()).prop_map(|(a, p)| Op::InsertFailing(a, p)),
            2 => (agent.clone(), port.clone()).prop_map(|(a, p)| Op::Get(a, p)),
            2 => (agent.clone(), port.clone()).prop_map(|(a, p)| Op::Touch(a, p)),
            3 => (0..=150u64).prop_map(Op::Advance),
            1 => Just(Op::Expire),
            1 => agent.prop_map(Op::RemoveAgent),
        ]
    }

    /// Reference model: key -> (id, last active in ms).
    type Model = BTreeMap<FlowKey, (FlowId, u64)>;

    fn live(last: u64, now: u64) -> bool {
        now - last < TIMEOUT.as_millis() as u64
    }

    proptest! {
        #[test]
        fn table_matches_model(cap in 0..4usize, ops in proptest::collection::vec(op(), 1..80)) {
            let t0 = Instant::now();
            let at = |ms: u64| t0 + Duration::from_millis(ms);
            let mut t = FlowTable::new(TIMEOUT, cap);
            let mut m: Model = BTreeMap::new();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Insert(a, p) | Op::InsertFailing(a, p) => {
                        let failing = matches!(op, Op::InsertFailing(..));
                        let k = key(a, p);
                        let mut closed = Vec::new();
                        let got = t.insert_with(k, at(now), &mut closed, |id| {
                            if failing { Err(()) } else { Ok(id) }
                        });
                        // Model.
                        let mut want_closed = Vec::new();
                        let want = 'want: {
                            if let Some(&(_, last)) = m.get(&k) {
                                if live(last, now) { break 'want Err(InsertError::Exists); }
                                m.remove(&k);
                                want_closed.push(k);
                            }
                            let count = m.keys().filter(|k| k.agent() == a).count();
                            if count >= cap {
                                let exp: Vec<_> = m.iter()
                                    .filter(|(k, (_, l))| k.agent() == a && !live(*l, now))
                                    .map(|(k, _)| *k).collect();
                                for k in exp { m.remove(&k); want_closed.push(k); }
                                if m.keys().filter(|k| k.agent() == a).count() >= cap {
                                    break 'want Err(InsertError::AgentFull);
                                }
                            }
                            if failing { break 'want Err(InsertError::Make(())); }
                            Ok(())
                        };
                        let mut got_closed: Vec<_> = closed.iter().map(|(k, _)| *k).collect();
                        got_closed.sort();
                        want_closed.sort();
                        prop_assert_eq!(got_closed, want_closed);
                        match (got, want) {
                            (Ok(id), Ok(())) => { m.insert(k, (id, now)); }
                            (got, want) => prop_assert_eq!(got.map(|_| ()), want),
                        }
                    }
                    Op::Get(a, p) => {
                        let k = key(a, p);
                        let got = t.get_mut(&k, at(now)).map(|(id, h)| { assert_eq!(id, *h); id });
                        let want = match m.get_mut(&k) {
                            Some((id, last)) if live(*last, now) => { *last = now; Some(*id) }
                            _ => None,
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Touch(a, p) => {
                        let k = key(a, p);
                        if let Some((id, last)) = m.get_mut(&k) {
                            let want = live(*last, now);
                            if want { *last = now; }
                            prop_assert_eq!(t.touch(&k, *id, at(now)), want);
                        }
                    }
                    Op::Advance(ms) => now += ms,
                    Op::Expire => {
                        let mut got: Vec<_> = t.expire(at(now)).into_iter().map(|(k, _)| k).collect();
                        got.sort();
                        let want: Vec<_> = m.iter().filter(|(_, (_, l))| !live(*l, now)).map(|(k, _)| *k).collect();
                        m.retain(|_, (_, l)| live(*l, now));
                        prop_assert_eq!(got, want);
                    }
                    Op::RemoveAgent(a) => {
                        let mut got: Vec<_> = t.remove_agent(a).into_iter().map(|(k, _)| k).collect();
                        got.sort();
                        let want: Vec<_> = m.keys().filter(|k| k.agent() == a).copied().collect();
                        m.retain(|k, _| k.agent() != a);
                        prop_assert_eq!(got, want);
                    }
                }
                // Invariants.
                prop_assert_eq!(t.len(), m.len());
                for a in 0..3 {
                    prop_assert!(t.agent_len(a) <= cap, "cap exceeded");
                    prop_assert_eq!(t.agent_len(a), m.keys().filter(|k| k.agent() == a).count());
                }
                for (k, (id, _)) in &m {
                    prop_assert_eq!(t.peek(k, *id), Some(id));
                }
            }
        }
    }
}
