//! Just enough of the classic pcap format (what `tcpdump -w` writes) to count packets and their
//! sizes, plus a byte search over a whole capture file.

use anyhow::{bail, Result};

/// One captured packet's lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketLen {
    /// Bytes stored in the file.
    pub captured: u32,
    /// Bytes on the wire.
    pub original: u32,
}

/// The packets of a classic pcap file (either byte order, micro- or nanosecond stamps). A
/// truncated last record (tcpdump killed mid-write) is ignored.
pub fn packets(file: &[u8]) -> Result<Vec<PacketLen>> {
    if file.len() < 24 {
        bail!(
            "pcap file too short ({} bytes) for its 24-byte header",
            file.len()
        );
    }
    let magic = [file[0], file[1], file[2], file[3]];
    let big_endian = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        [0x0a, 0x0d, 0x0d, 0x0a] => {
            bail!("pcapng is not supported; tcpdump -w writes classic pcap")
        }
        _ => bail!("not a pcap file (magic {magic:02x?})"),
    };
    let u32_at = |at: usize| {
        let b = [file[at], file[at + 1], file[at + 2], file[at + 3]];
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let mut out = Vec::new();
    let mut at = 24usize;
    while at + 16 <= file.len() {
        let captured = u32_at(at + 8);
        let original = u32_at(at + 12);
        let end = at + 16 + captured as usize;
        if end > file.len() {
            break;
        }
        out.push(PacketLen { captured, original });
        at = end;
    }
    Ok(out)
}

/// How many times `needle` occurs in `haystack` (overlapping occurrences counted).
pub fn count_occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || needle.len() > haystack.len() {
        return 0;
    }
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_records_and_finds_bytes() {
        let mut f = vec![0xd4, 0xc3, 0xb2, 0xa1];
        f.extend_from_slice(&[0u8; 20]);
        for len in [5u32, 3] {
            f.extend_from_slice(&[0u8; 8]);
            f.extend_from_slice(&len.to_le_bytes());
            f.extend_from_slice(&(len + 100).to_le_bytes());
            f.extend(std::iter::repeat_n(b'x', len as usize));
        }
        f.extend_from_slice(&[1, 2, 3]); // truncated record
        let p = packets(&f).expect("valid pcap");
        assert_eq!(
            p,
            vec![
                PacketLen {
                    captured: 5,
                    original: 105
                },
                PacketLen {
                    captured: 3,
                    original: 103
                }
            ]
        );
        assert_eq!(count_occurrences(&f, b"xxx"), 4);
        assert_eq!(count_occurrences(&f, b"yy"), 0);
        assert!(packets(b"short").is_err());
    }
}
