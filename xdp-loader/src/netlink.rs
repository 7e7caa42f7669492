//! Attaching and detaching XDP programs the old way, through rtnetlink (`RTM_SETLINK` with
//! `IFLA_XDP`): what `ip link set DEV xdp ...` does, and what aya falls back to on kernels
//! without XDP BPF links. A program attached like that stays on the interface after its
//! process dies, and makes a new BPF-link attachment fail with `EBUSY`; the loader uses
//! [`set_xdp_fd`] with fd -1 to remove such a stale program.

use std::io;

const RTM_SETLINK: u16 = 19;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const IFLA_XDP: u16 = 43;
const NLA_F_NESTED: u16 = 0x8000;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_FLAGS: u16 = 3;

/// `XDP_FLAGS_SKB_MODE`.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`.
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// The `RTM_SETLINK` request that sets the XDP program `fd` (-1: none) of interface `index`.
fn request(index: u32, fd: i32, flags: u32, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::with_capacity(16);
    for (kind, value) in [
        (IFLA_XDP_FD, fd.to_ne_bytes()),
        (IFLA_XDP_FLAGS, flags.to_ne_bytes()),
    ] {
        attrs.extend_from_slice(&8u16.to_ne_bytes());
        attrs.extend_from_slice(&kind.to_ne_bytes());
        attrs.extend_from_slice(&value);
    }
    let nested_len = 4 + attrs.len();
    let total = 16 + 16 + nested_len;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_SETLINK.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifinfomsg: family, pad, type, index, flags, change
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    m.extend_from_slice(&(index as i32).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(nested_len as u16).to_ne_bytes());
    m.extend_from_slice(&(IFLA_XDP | NLA_F_NESTED).to_ne_bytes());
    m.extend_from_slice(&attrs);
    m
}

/// The error code of the kernel's acknowledgement (0: success), if `reply` is one for `seq`.
fn ack_error(reply: &[u8], seq: u32) -> Option<i32> {
    if reply.len() < 20 {
        return None;
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    let got_seq = u32::from_ne_bytes([reply[8], reply[9], reply[10], reply[11]]);
    (kind == NLMSG_ERROR && got_seq == seq)
        .then(|| i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]))
}

/// Sets (or with `fd` -1 removes) the XDP program of interface `index` in the mode `flags`
/// names, through rtnetlink. Needs CAP_NET_ADMIN.
pub fn set_xdp_fd(index: u32, fd: i32, flags: u32) -> io::Result<()> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let fd_raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let seq = 1;
    let msg = request(index, fd, flags, seq);
    // SAFETY: sending a buffer we own to the kernel (destination: the kernel, via send on an
    // unconnected netlink socket, which defaults to pid 0).
    let sent = unsafe { libc::send(fd_raw, msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: receiving into a buffer we own, bounded by its length.
        let n = unsafe { libc::recv(fd_raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        match ack_error(&buf[..n as usize], seq) {
            Some(0) => return Ok(()),
            Some(e) => return Err(io::Error::from_raw_os_error(-e)),
            None => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = request(7, -1, XDP_FLAGS_SKB_MODE, 9);
        assert_eq!(m.len(), 16 + 16 + 4 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_SETLINK);
        assert_eq!(i32::from_ne_bytes([m[20], m[21], m[22], m[23]]), 7);
        assert_eq!(u16::from_ne_bytes([m[34], m[35]]), IFLA_XDP | NLA_F_NESTED);
        assert_eq!(i32::from_ne_bytes([m[40], m[41], m[42], m[43]]), -1);
        assert_eq!(
            u32::from_ne_bytes([m[48], m[49], m[50], m[51]]),
            XDP_FLAGS_SKB_MODE
        );
    }

    #[test]
    fn acks() {
        let mut r = vec![0u8; 36];
        r[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        r[8..12].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(ack_error(&r, 3), Some(0));
        r[16..20].copy_from_slice(&(-16i32).to_ne_bytes());
        assert_eq!(ack_error(&r, 3), Some(-16));
        assert_eq!(ack_error(&r, 4), None);
        assert_eq!(ack_error(&r[..10], 3), None);
    }
}
