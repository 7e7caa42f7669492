//! Fragmentation of packets towards an agent, pure.
//!
//! A backend may answer with a datagram larger than the inner connection carries (a 4 KiB UDP
//! reply, say). Like a router in front of a smaller link, the connector splits such an IPv4
//! packet into IPv4 fragments, which the agent's kernel reassembles; packets with DF set are
//! not split. IPv6 routers never fragment, but the connector is the source of the IPv6 packets
//! it builds for agents (it ends every flow), so it splits them as a source host does, with a
//! fragment header (RFC 8200 4.5).

use etherparse::{ip_number, IpNumber, Ipv6Header};

/// Why a packet could not be fragmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FragmentError {
    /// Not a well-formed IPv4 packet, or IPv6 packet without extension headers.
    #[error("not a well-formed IPv4 or IPv6 packet (IPv6 without extension headers)")]
    Malformed,
    /// The packet has Don't Fragment set.
    #[error("packet has Don't Fragment set")]
    DontFragment,
    /// `max` leaves no room for 8 bytes of payload after the header.
    #[error("fragment size too small")]
    TooSmall,
}

/// Splits `packet` (IPv4, or IPv6 without extension headers) into fragments of at most `max`
/// bytes; `ident` gives the identification of IPv6 fragments, and is called only for an IPv6
/// packet (IPv4 keeps the packet's own). A packet that fits comes back whole.
pub(crate) fn fragment(
    packet: &[u8],
    max: usize,
    ident: impl FnOnce() -> u32,
) -> Result<Vec<Vec<u8>>, FragmentError> {
    match packet.first().map(|b| b >> 4) {
        Some(6) => fragment_ipv6(packet, max, ident()),
        _ => fragment_ipv4(packet, max),
    }
}

/// Splits an IPv6 packet without extension headers into fragments of at most `max` bytes, each
/// with a fragment header carrying `ident`. A packet that fits comes back whole.
pub(crate) fn fragment_ipv6(
    packet: &[u8],
    max: usize,
    ident: u32,
) -> Result<Vec<Vec<u8>>, FragmentError> {
    if packet.len() < Ipv6Header::LEN || packet[0] >> 4 != 6 {
        return Err(FragmentError::Malformed);
    }
    let total = Ipv6Header::LEN + usize::from(u16::from_be_bytes([packet[4], packet[5]]));
    if total > packet.len() {
        return Err(FragmentError::Malformed);
    }
    if total <= max {
        return Ok(vec![packet[..total].to_vec()]);
    }
    let next = packet[6];
    if IpNumber(next).is_ipv6_ext_header_value() {
        // The connector builds none; finding the unfragmentable part is not worth it here.
        return Err(FragmentError::Malformed);
    }
    let chunk = max.saturating_sub(Ipv6Header::LEN + 8) / 8 * 8;
    if chunk == 0 {
        return Err(FragmentError::TooSmall);
    }
    let payload = &packet[Ipv6Header::LEN..total];
    let mut out = Vec::with_capacity(payload.len().div_ceil(chunk));
    for (i, piece) in payload.chunks(chunk).enumerate() {
        let offset = i * chunk;
        let more = offset + piece.len() < payload.len();
        let mut f = Vec::with_capacity(Ipv6Header::LEN + 8 + piece.len());
        f.extend_from_slice(&packet[..Ipv6Header::LEN]);
        // 8 + piece.len() <= max <= what the caller's u16-sized packet had.
        let len = u16::try_from(8 + piece.len()).map_err(|_| FragmentError::TooSmall)?;
        f[4..6].copy_from_slice(&len.to_be_bytes());
        f[6] = ip_number::IPV6_FRAG.0;
        // offset < 65536, so offset / 8 fits into 13 bits.
        let off_flags = ((offset / 8) as u16) << 3 | u16::from(more);
        f.extend_from_slice(&[next, 0]);
        f.extend_from_slice(&off_flags.to_be_bytes());
        f.extend_from_slice(&ident.to_be_bytes());
        f.extend_from_slice(piece);
        out.push(f);
    }
    Ok(out)
}

const DF: u16 = 0x4000;
const MF: u16 = 0x2000;

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Splits `packet` into fragments of at most `max` bytes; a packet that fits comes back whole.
pub(crate) fn fragment_ipv4(packet: &[u8], max: usize) -> Result<Vec<Vec<u8>>, FragmentError> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Err(FragmentError::Malformed);
    }
    let hlen = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if hlen < 20 || total < hlen || total > packet.len() {
        return Err(FragmentError::Malformed);
    }
    if total <= max {
        return Ok(vec![packet[..total].to_vec()]);
    }
    let flags_offset = u16::from_be_bytes([packet[6], packet[7]]);
    if flags_offset & DF != 0 {
        return Err(FragmentError::DontFragment);
    }
    let chunk = max.saturating_sub(hlen) / 8 * 8;
    if chunk == 0 {
        return Err(FragmentError::TooSmall);
    }
    let base = usize::from(flags_offset & 0x1fff) * 8;
    let more_after = flags_offset & MF != 0;
    let payload = &packet[hlen..total];
    let mut out = Vec::with_capacity(payload.len().div_ceil(chunk));
    for (i, piece) in payload.chunks(chunk).enumerate() {
        let offset = base + i * chunk;
        let last = (i + 1) * chunk >= payload.len();
        let mut f = Vec::with_capacity(hlen + piece.len());
        f.extend_from_slice(&packet[..hlen]);
        f.extend_from_slice(piece);
        let len = (hlen + piece.len()) as u16;
        f[2..4].copy_from_slice(&len.to_be_bytes());
        let flags = if last && !more_after { 0 } else { MF };
        f[6..8].copy_from_slice(&(flags | (offset / 8) as u16).to_be_bytes());
        f[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(&f[..hlen]);
        f[10..12].copy_from_slice(&sum.to_be_bytes());
        out.push(f);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use etherparse::Ipv4HeaderSlice;
    use proptest::prelude::*;

    use super::*;

    /// A reply as the data plane builds it (DF clear).
    fn udp(len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        crate::dataplane::packet::build_udp(
            "10.100.0.1:7".parse().unwrap(),
            "100.64.0.9:40000".parse().unwrap(),
            &payload,
        )
        .unwrap()
    }

    /// Reassembles fragments by offset and checks every header.
    fn reassemble(frags: &[Vec<u8>], max: usize) -> Vec<u8> {
        let first = Ipv4HeaderSlice::from_slice(&frags[0]).unwrap();
        let mut data = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= max);
            let h = Ipv4HeaderSlice::from_slice(f).unwrap();
            assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
            assert_eq!(h.identification(), first.identification());
            assert_eq!(h.source_addr(), Ipv4Addr::new(10, 100, 0, 1));
            assert_eq!(usize::from(h.fragments_offset().value()) * 8, data.len());
            assert_eq!(h.more_fragments(), i + 1 < frags.len());
            data.extend_from_slice(&f[h.slice().len()..]);
        }
        let mut whole = frags[0][..first.slice().len()].to_vec();
        whole.extend_from_slice(&data);
        let len = whole.len() as u16;
        whole[2..4].copy_from_slice(&len.to_be_bytes());
        whole[6..8].copy_from_slice(&[0, 0]);
        whole[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(&whole[..20]);
        whole[10..12].copy_from_slice(&sum.to_be_bytes());
        whole
    }

    #[test]
    fn large_reply_is_split_and_reassembles() {
        let p = udp(4000);
        let frags = fragment_ipv4(&p, 1320).unwrap();
        assert_eq!(frags.len(), 4);
        assert_eq!(reassemble(&frags, 1320), p);
    }

    #[test]
    fn fitting_df_and_garbage() {
        let p = udp(100);
        assert_eq!(fragment_ipv4(&p, 1320).unwrap(), vec![p.clone()]);
        let mut df = udp(2000);
        df[6] |= 0x40;
        assert_eq!(fragment_ipv4(&df, 1320), Err(FragmentError::DontFragment));
        assert_eq!(
            fragment_ipv4(&[0x45; 10], 1320),
            Err(FragmentError::Malformed)
        );
        assert_eq!(fragment_ipv4(&udp(2000), 24), Err(FragmentError::TooSmall));
    }

    fn udp6(len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        crate::dataplane::packet::build_udp(
            "[fd00:100::1]:7".parse().unwrap(),
            "[fd7a:7a74:6e61:7475::6440:9]:40000".parse().unwrap(),
            &payload,
        )
        .unwrap()
    }

    /// Reassembles IPv6 fragments by offset, checking every header; the whole packet as it was.
    fn reassemble6(frags: &[Vec<u8>], max: usize, ident: u32) -> Vec<u8> {
        let mut data = Vec::new();
        let next = frags[0][40];
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= max);
            assert_eq!(f[6], 44);
            assert_eq!(f[40], next);
            assert_eq!(usize::from(u16::from_be_bytes([f[4], f[5]])) + 40, f.len());
            let off_flags = u16::from_be_bytes([f[42], f[43]]);
            assert_eq!(usize::from(off_flags >> 3) * 8, data.len());
            assert_eq!(off_flags & 1 == 1, i + 1 < frags.len());
            assert_eq!(u32::from_be_bytes([f[44], f[45], f[46], f[47]]), ident);
            data.extend_from_slice(&f[48..]);
        }
        let mut whole = frags[0][..40].to_vec();
        whole[6] = next;
        whole[4..6].copy_from_slice(&(data.len() as u16).to_be_bytes());
        whole.extend_from_slice(&data);
        whole
    }

    #[test]
    fn large_ipv6_reply_is_split_and_reassembles() {
        let p = udp6(4000);
        let frags = fragment(&p, 1320, || 77).unwrap();
        assert_eq!(frags.len(), 4);
        assert_eq!(reassemble6(&frags, 1320, 77), p);
        assert_eq!(fragment(&udp6(100), 1320, || 1).unwrap(), vec![udp6(100)]);
        assert_eq!(
            fragment(&udp6(2000), 50, || 1),
            Err(FragmentError::TooSmall)
        );
        assert_eq!(
            fragment(&[0x60; 39], 1320, || 1),
            Err(FragmentError::Malformed)
        );
    }

    proptest! {
        #[test]
        fn any_ipv6_size_round_trips(len in 0usize..9000, max in 56usize..1500, ident in any::<u32>()) {
            let p = udp6(len);
            let frags = fragment(&p, max, || ident).unwrap();
            if p.len() <= max {
                prop_assert_eq!(frags, vec![p]);
            } else {
                prop_assert_eq!(reassemble6(&frags, max, ident), p);
            }
        }

        #[test]
        fn ipv6_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), max in 0usize..300, ident in any::<u32>()) {
            let mut b = bytes;
            if let Some(first) = b.first_mut() {
                *first = 0x60 | (*first & 0x0f);
            }
            let _ = fragment(&b, max, || ident);
        }

        #[test]
        fn any_size_round_trips(len in 0usize..9000, max in 68usize..1500) {
            let p = udp(len);
            let frags = fragment_ipv4(&p, max).unwrap();
            prop_assert_eq!(reassemble(&frags, max), p);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), max in 0usize..300) {
            let _ = fragment_ipv4(&bytes, max);
        }
    }
}
