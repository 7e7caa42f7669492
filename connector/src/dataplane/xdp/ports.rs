//! Local UDP ports of fast-path flows, pure: one port of the configured range per flow, handed
//! out round-robin so a port that was just freed is the last to be reused (late replies to an
//! old flow then find no flow and are dropped rather than reaching a new one).

use std::collections::HashSet;

/// The flow port range and which of its ports are in use.
#[derive(Debug)]
pub(crate) struct PortPool {
    first: u16,
    last: u16,
    next: u16,
    used: HashSet<u16>,
}

impl PortPool {
    /// All ports `first..=last` free. `first <= last`.
    pub(crate) fn new(first: u16, last: u16) -> Self {
        Self {
            first,
            last: last.max(first),
            next: first,
            used: HashSet::new(),
        }
    }

    fn size(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// A free port, or `None` if all are in use.
    pub(crate) fn alloc(&mut self) -> Option<u16> {
        if self.used.len() >= self.size() {
            return None;
        }
        loop {
            let p = self.next;
            self.next = if p == self.last { self.first } else { p + 1 };
            if self.used.insert(p) {
                return Some(p);
            }
        }
    }

    /// Returns `port` to the pool.
    pub(crate) fn free(&mut self, port: u16) {
        self.used.remove(&port);
    }

    /// Ports in use.
    pub(crate) fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_until_full() {
        let mut p = PortPool::new(100, 102);
        assert_eq!(
            [p.alloc(), p.alloc(), p.alloc()],
            [Some(100), Some(101), Some(102)]
        );
        assert_eq!(p.alloc(), None);
        p.free(101);
        p.free(100);
        // 100 and 101 are free; the search goes on from 100 after wrapping.
        assert_eq!(p.alloc(), Some(100));
        assert_eq!(p.alloc(), Some(101));
        assert_eq!(p.in_use(), 3);
        p.free(102);
        p.free(102);
        assert_eq!(p.in_use(), 2);
        let mut one = PortPool::new(65535, 65535);
        assert_eq!((one.alloc(), one.alloc()), (Some(65535), None));
    }

    #[test]
    fn freed_port_is_not_reused_at_once() {
        let mut p = PortPool::new(1, 10);
        let a = p.alloc().expect("port");
        p.free(a);
        assert_ne!(p.alloc(), Some(a));
    }
}
