//! Packets cut from a shared buffer: the per-packet path's way to hand out owned [`Bytes`]
//! without an allocation per packet.
//!
//! A [`PacketArena`] copies (or builds) each packet at the end of one buffer and splits it off
//! as a [`Bytes`] that shares that buffer. When the buffer has no room left, a new one is
//! allocated, or the old one is taken back if every packet cut from it has been dropped by
//! then (what `BytesMut::reserve` does for a buffer it holds the only reference to). Memory
//! held is at most one buffer per chunk of packets still alive somewhere (queued in quinn,
//! say), plus the one being filled.

use bytes::{Bytes, BytesMut};

/// A buffer packets are cut from. See the module documentation.
#[derive(Debug)]
pub struct PacketArena {
    buf: BytesMut,
    chunk: usize,
}

impl Default for PacketArena {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketArena {
    /// Bytes of one buffer by default: about 200 packets of a 1280-byte MTU.
    pub const CHUNK: usize = 256 * 1024;

    /// An empty arena of [`PacketArena::CHUNK`]-byte buffers; its first packet allocates its
    /// first buffer.
    pub fn new() -> Self {
        Self::with_chunk(Self::CHUNK)
    }

    /// An empty arena of `chunk`-byte buffers (where many arenas live at once).
    pub fn with_chunk(chunk: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            chunk,
        }
    }

    /// Makes room for `len` more bytes: a new buffer (or the old one, if nothing cut from it
    /// is alive) when the current one has less than that left.
    fn room(&mut self, len: usize) {
        if self.buf.capacity() < len {
            self.buf.reserve(self.chunk.max(len));
        }
    }

    /// `packet`, copied into the arena.
    pub fn copy(&mut self, packet: &[u8]) -> Bytes {
        self.room(packet.len());
        self.buf.extend_from_slice(packet);
        self.buf.split().freeze()
    }

    /// `packet`, copied into the arena and then changed in place by `fix`; returns it with
    /// what `fix` returned.
    pub fn copy_with<R>(&mut self, packet: &[u8], fix: impl FnOnce(&mut [u8]) -> R) -> (Bytes, R) {
        self.room(packet.len());
        self.buf.extend_from_slice(packet);
        let r = fix(&mut self.buf[..]);
        (self.buf.split().freeze(), r)
    }

    /// A packet of `len` bytes, zeroed, then written by `fill`; returns it with what `fill`
    /// returned.
    pub fn build<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> (Bytes, R) {
        self.room(len);
        self.buf.resize(len, 0);
        let r = fill(&mut self.buf[..]);
        (self.buf.split().freeze(), r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_with_changes_only_the_copy() {
        let mut arena = PacketArena::new();
        let original = [1u8, 2, 3, 4];
        let (p, sum) = arena.copy_with(&original, |b| {
            b[0] = 9;
            b.iter().map(|&x| u32::from(x)).sum::<u32>()
        });
        assert_eq!(&p[..], &[9, 2, 3, 4]);
        assert_eq!(sum, 18);
        assert_eq!(original, [1, 2, 3, 4]);
        let q = arena.copy(&[5]);
        assert_eq!((&p[..], &q[..]), (&[9, 2, 3, 4][..], &[5][..]));
    }

    #[test]
    fn packets_share_a_buffer_which_is_reused_once_they_are_gone() {
        let mut arena = PacketArena::new();
        let a = arena.copy(&[1; 1280]);
        let (b, r) = arena.build(60, |buf| {
            assert_eq!(buf, &[0; 60][..]);
            buf.fill(2);
            7
        });
        assert_eq!((&a[..], &b[..], r), (&[1; 1280][..], &[2; 60][..], 7));
        // One allocation: the second packet follows the first in it.
        assert_eq!(b.as_ptr(), a.as_ptr().wrapping_add(1280));
        let first = a.as_ptr();
        drop((a, b));
        // Use the buffer up; once every packet cut from it is gone, the next packet goes back
        // to its start instead of into a new allocation.
        let mut held = Vec::new();
        while arena.buf.capacity() >= 1280 {
            held.push(arena.copy(&[3; 1280]));
        }
        assert!(held.len() >= PacketArena::CHUNK / 1280 - 1);
        assert!(held.iter().all(|p| p[..] == [3; 1280][..]));
        drop(held);
        let c = arena.copy(&[4; 1280]);
        assert_eq!(c.as_ptr(), first);
        assert_eq!(&c[..], &[4; 1280][..]);
    }

    #[test]
    fn a_live_packet_keeps_its_bytes_when_the_arena_moves_on() {
        let mut arena = PacketArena::new();
        let kept = arena.copy(&[9; 1000]);
        for i in 0..1000u32 {
            let (p, ()) = arena.build(1200, |buf| buf.fill(i as u8));
            assert!(p.iter().all(|&x| x == i as u8));
        }
        assert_eq!(&kept[..], &[9; 1000][..]);
        // A packet larger than a buffer still arrives whole.
        let big = arena.copy(&vec![5; PacketArena::CHUNK + 1]);
        assert_eq!(big.len(), PacketArena::CHUNK + 1);
        assert!(big.iter().all(|&x| x == 5));
    }
}
