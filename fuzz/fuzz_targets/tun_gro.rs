//! Arbitrary packets as a batch the Linux agent writes to its TUN device: tun-rs's GRO
//! (`GROTable::apply_gro`), which coalesces the batch in place before the write, never panics
//! and never grows a buffer beyond the largest packet the device takes (64 KiB and the virtio
//! header) unless the packet put there was larger to begin with.
//!
//! The packets come from connectors, after the agent's inbound check (source and protocol), so
//! their TCP and UDP headers and payloads are whatever a compromised connector makes them.
//! Input: one byte (bit 0: UDP GRO allowed), then packets as a big-endian `u16` length and that
//! many bytes, at most `IDEAL_BATCH_SIZE` of them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    while bufs.len() < IDEAL_BATCH_SIZE && rest.len() >= 2 {
        let len = (usize::from(rest[0]) << 8 | usize::from(rest[1])).min(rest.len() - 2);
        let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN];
        buf.extend_from_slice(&rest[2..2 + len]);
        bufs.push(buf);
        rest = &rest[2 + len..];
    }
    if bufs.is_empty() {
        return;
    }
    let before: Vec<usize> = bufs.iter().map(Vec::len).collect();
    let mut gro = GROTable::default();
    // An error (an empty packet) refuses the whole batch; the agent counts it and goes on.
    let _ = gro.apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, flags & 1 == 1);
    for (buf, len) in bufs.iter().zip(before) {
        assert!(buf.len() <= len.max(VIRTIO_NET_HDR_LEN + 65535));
    }
});
