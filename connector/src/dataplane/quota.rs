//! Pure limits of the data plane: caps on UDP/ICMP flows and TCP connections counted per agent
//! *identity* (every inner connection of one certificate together) and for the whole connector,
//! and a token bucket for the answers the connector generates to refused packets. No I/O; the
//! token bucket takes time as an argument.
//!
//! A [`Permit`] holds one unit of both counts (the identity's and the global one) and gives it
//! back when dropped, so a flow or connection that holds one can't leak its slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What a permit is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A UDP or ICMP echo flow.
    Flow,
    /// A TCP connection (connecting or open).
    Tcp,
}

/// Counts of one identity, or of the whole connector.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    flows: AtomicUsize,
    tcp: AtomicUsize,
}

impl Counts {
    fn of(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::Flow => &self.flows,
            Kind::Tcp => &self.tcp,
        }
    }

    /// How many of `kind` are held now.
    #[cfg(test)]
    pub(crate) fn held(&self, kind: Kind) -> usize {
        self.of(kind).load(Ordering::Relaxed)
    }

    /// Takes one unit if fewer than `cap` are held.
    fn take(&self, kind: Kind, cap: usize) -> bool {
        self.of(kind)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    fn give(&self, kind: Kind) {
        let _ = self
            .of(kind)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// The caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    /// Flows (UDP and ICMP echo) one identity may hold.
    pub(crate) flows_per_identity: usize,
    /// Flows the connector may hold.
    pub(crate) flows_total: usize,
    /// TCP connections one identity may hold.
    pub(crate) tcp_per_identity: usize,
    /// TCP connections the connector may hold.
    pub(crate) tcp_total: usize,
}

impl Caps {
    fn of(&self, kind: Kind) -> (usize, usize) {
        match kind {
            Kind::Flow => (self.flows_per_identity, self.flows_total),
            Kind::Tcp => (self.tcp_per_identity, self.tcp_total),
        }
    }
}

/// Which cap refused a permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The identity holds its maximum.
    Identity,
    /// The connector holds its maximum.
    Global,
}

/// One agent connection's view of the limits: its identity's counts and the global ones.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) caps: Caps,
    pub(crate) identity: Arc<Counts>,
    pub(crate) global: Arc<Counts>,
}

impl Limits {
    /// One unit of `kind`, if neither the identity nor the connector is at its cap.
    pub(crate) fn acquire(&self, kind: Kind) -> Result<Permit, Full> {
        let (per_identity, total) = self.caps.of(kind);
        if !self.identity.take(kind, per_identity) {
            return Err(Full::Identity);
        }
        if !self.global.take(kind, total) {
            self.identity.give(kind);
            return Err(Full::Global);
        }
        Ok(Permit {
            kind,
            identity: self.identity.clone(),
            global: self.global.clone(),
        })
    }
}

/// One unit of an identity's and the connector's count; given back on drop.
#[derive(Debug)]
pub(crate) struct Permit {
    kind: Kind,
    identity: Arc<Counts>,
    global: Arc<Counts>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.identity.give(self.kind);
        self.global.give(self.kind);
    }
}

/// The connector-wide budget for large TCP buffers: a connection gets its full-size buffers
/// (enough for a fast transfer over a long path) only while their sum over all connections stays
/// within the budget; later ones get small buffers until earlier ones close.
#[derive(Debug)]
pub(crate) struct BufferBudget {
    budget: usize,
    allotted: AtomicUsize,
}

impl BufferBudget {
    /// A budget of `budget` bytes, none of it allotted.
    pub(crate) fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self {
            budget,
            allotted: AtomicUsize::new(0),
        })
    }

    /// `bytes` of the budget, if that much is left; given back when the grant is dropped.
    pub(crate) fn take(self: &Arc<Self>, bytes: usize) -> Option<BufferGrant> {
        self.allotted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(bytes).filter(|&m| m <= self.budget)
            })
            .ok()?;
        Some(BufferGrant {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes allotted now.
    #[cfg(test)]
    pub(crate) fn allotted(&self) -> usize {
        self.allotted.load(Ordering::Relaxed)
    }
}

/// Bytes of a [`BufferBudget`], given back on drop.
#[derive(Debug)]
pub(crate) struct BufferGrant {
    budget: Arc<BufferBudget>,
    bytes: usize,
}

impl Drop for BufferGrant {
    fn drop(&mut self) {
        let _ = self
            .budget
            .allotted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_sub(self.bytes)
            });
    }
}

/// The answers to refused packets share the one token bucket of the core: `rate` per second,
/// bursts of up to `rate`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    rate: ztna_core::bucket::Rate,
    tokens: ztna_core::bucket::TokenBucket,
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn new(rate: u32) -> Self {
        Self {
            rate: ztna_core::bucket::Rate::per_sec(rate),
            tokens: ztna_core::bucket::TokenBucket::full(),
        }
    }

    /// Takes a token at `now`, if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.tokens.take(self.rate, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(global: &Arc<Counts>) -> Limits {
        Limits {
            caps: Caps {
                flows_per_identity: 3,
                flows_total: 5,
                tcp_per_identity: 2,
                tcp_total: 100,
            },
            identity: Arc::new(Counts::default()),
            global: global.clone(),
        }
    }

    #[test]
    fn caps_count_per_identity_across_connections_and_globally() {
        let global = Arc::new(Counts::default());
        let alice = limits(&global);
        // A second inner connection of the same identity shares its counts.
        let alice2 = alice.clone();
        let bob = limits(&global);
        let a: Vec<Permit> = (0..3)
            .map(|i| {
                if i % 2 == 0 { &alice } else { &alice2 }
                    .acquire(Kind::Flow)
                    .expect("under the cap")
            })
            .collect();
        assert_eq!(alice2.acquire(Kind::Flow).err(), Some(Full::Identity));
        assert_eq!(alice.acquire(Kind::Flow).err(), Some(Full::Identity));
        let b: Vec<Permit> = (0..2)
            .map(|_| bob.acquire(Kind::Flow).expect("bob's own cap"))
            .collect();
        assert_eq!(bob.acquire(Kind::Flow).err(), Some(Full::Global));
        assert_eq!(global.held(Kind::Flow), 5);
        assert_eq!(
            bob.identity.held(Kind::Flow),
            2,
            "a global refusal takes nothing"
        );
        // TCP is counted apart.
        let t1 = alice.acquire(Kind::Tcp).expect("tcp");
        let _t2 = alice2.acquire(Kind::Tcp).expect("tcp");
        assert_eq!(alice.acquire(Kind::Tcp).err(), Some(Full::Identity));
        drop(t1);
        assert!(alice.acquire(Kind::Tcp).is_ok());
        // Dropping permits gives the slots back.
        drop(a);
        drop(b);
        assert_eq!(global.held(Kind::Flow), 0);
        assert_eq!(alice.identity.held(Kind::Flow), 0);
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10);
        assert_eq!((0..100).filter(|_| b.take(t0)).count(), 10);
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(100)));
        let mut n = 0;
        let mut now = t0 + Duration::from_millis(100);
        while now < t0 + Duration::from_secs(10) {
            n += usize::from(b.take(now));
            now += Duration::from_millis(1);
        }
        assert!((95..=101).contains(&n), "{n} in 9.9 s at 10/s");
    }

    #[test]
    fn buffer_budget_grants_until_spent_and_takes_back_on_drop() {
        let budget = BufferBudget::new(10);
        let a = budget.take(4).expect("within");
        let b = budget.take(6).expect("exactly the rest");
        assert!(budget.take(1).is_none(), "spent");
        assert_eq!(budget.allotted(), 10);
        drop(a);
        assert_eq!(budget.allotted(), 6);
        assert!(budget.take(5).is_none(), "only 4 left");
        let c = budget.take(4).expect("what a gave back");
        drop((b, c));
        assert_eq!(budget.allotted(), 0);
        assert!(budget.take(usize::MAX).is_none(), "no overflow");
    }
}
