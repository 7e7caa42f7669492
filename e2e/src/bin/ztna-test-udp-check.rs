//! `ztna-test-udp-check TARGET [options]`: a UDP round-trip checker for the end-to-end tests.
//!
//! It sends `--count` datagrams to TARGET (an echo server), one at a time, waits for each echo
//! and compares it byte for byte. Sizes run through every value of `1..=--max-size` in a
//! scattered order (the first datagram is the largest); each datagram's content is distinct
//! (sequence number (little-endian, so even 1-byte datagrams differ), run id and pseudo-random fill, or the `--fill` text). A datagram that gets
//! no echo within `--timeout-ms` is sent again, at most `--retries` times. Late echoes of earlier
//! datagrams are recognised and ignored. It prints one summary line and exits 0 when every
//! datagram came back intact (or, with `--expect-silence`, when none came back at all),
//! 1 otherwise, 2 on usage or socket errors.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: ztna-test-udp-check TARGET [--count N] [--max-size BYTES] \
[--timeout-ms MS] [--retries N] [--bind ADDR] [--fill TEXT] [--expect-silence] [--quiet]";

struct Opts {
    target: SocketAddr,
    count: u32,
    max_size: usize,
    timeout: Duration,
    retries: u32,
    bind: SocketAddr,
    fill: Option<Vec<u8>>,
    expect_silence: bool,
    quiet: bool,
}

#[derive(Default)]
struct Stats {
    ok: u32,
    lost: u32,
    mismatched: u32,
    retransmits: u32,
    stale: u32,
    refused: u32,
    replies: u32,
    bytes: u64,
    rtt_sum: Duration,
    rtt_max: Duration,
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztna-test-udp-check: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ztna-test-udp-check: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_args() -> Result<Option<Opts>, String> {
    let mut target = None;
    let mut o = Opts {
        target: SocketAddr::from(([127, 0, 0, 1], 7)),
        count: 1000,
        max_size: 1232,
        timeout: Duration::from_millis(1000),
        retries: 3,
        bind: SocketAddr::from(([0, 0, 0, 0], 0)),
        fill: None,
        expect_silence: false,
        quiet: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--count" => o.count = num(&value("--count")?)?,
            "--max-size" => o.max_size = num(&value("--max-size")?)?,
            "--timeout-ms" => o.timeout = Duration::from_millis(num(&value("--timeout-ms")?)?),
            "--retries" => o.retries = num(&value("--retries")?)?,
            "--bind" => {
                let v = value("--bind")?;
                o.bind = v.parse().map_err(|_| format!("bad --bind {v:?}"))?;
            }
            "--fill" => o.fill = Some(value("--fill")?.into_bytes()),
            "--expect-silence" => o.expect_silence = true,
            "--quiet" => o.quiet = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            a if a.starts_with('-') => return Err(format!("unknown option {a}")),
            a => target = Some(a.parse().map_err(|_| format!("bad target {a:?}"))?),
        }
    }
    o.target = target.ok_or("missing TARGET (IP:PORT)")?;
    if o.max_size == 0 || o.max_size > 65507 {
        return Err("--max-size must be in 1..=65507".into());
    }
    if o.fill.as_ref().is_some_and(|f| f.is_empty()) {
        return Err("--fill must not be empty".into());
    }
    if o.timeout.is_zero() {
        return Err("--timeout-ms must be positive".into());
    }
    Ok(Some(o))
}

fn num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad number {s:?}"))
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Size of datagram `seq`: a permutation of `1..=max` (stride coprime to `max`), largest first.
fn size_of(seq: u32, max: usize) -> usize {
    let mut stride = max / 2 + 1;
    while gcd(stride, max) != 1 {
        stride += 1;
    }
    max - (seq as usize * stride) % max
}

/// Distinct content for datagram `seq`: sequence number and run id, then pseudo-random bytes
/// (or the fill text repeated). Datagrams shorter than the header carry a prefix of it.
fn payload(seq: u32, run_id: u32, size: usize, fill: Option<&[u8]>) -> Vec<u8> {
    let mut p = Vec::with_capacity(size);
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&run_id.to_le_bytes());
    match fill {
        Some(f) => {
            p.push(b' ');
            while p.len() < size {
                p.extend_from_slice(f);
            }
        }
        None => {
            let mut x = u64::from(seq) << 32 | u64::from(run_id) | 1;
            while p.len() < size {
                // xorshift64*
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                p.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
            }
        }
    }
    p.truncate(size);
    p
}

fn run(o: &Opts) -> Result<bool, String> {
    let sock = UdpSocket::bind(o.bind).map_err(|e| format!("bind {}: {e}", o.bind))?;
    sock.connect(o.target)
        .map_err(|e| format!("connect {}: {e}", o.target))?;
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ std::process::id().rotate_left(16))
        .unwrap_or(0x5eed);
    let mut recent: VecDeque<Vec<u8>> = VecDeque::new();
    let mut st = Stats::default();
    let mut buf = vec![0u8; 65536];
    let started = Instant::now();

    for seq in 0..o.count {
        let size = size_of(seq, o.max_size);
        let p = payload(seq, run_id, size, o.fill.as_deref());
        let mut delivered = false;
        'attempts: for attempt in 0..=o.retries {
            if attempt > 0 {
                st.retransmits += 1;
            }
            match sock.send(&p) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    // An ICMP port unreachable for an earlier datagram; this one was not sent.
                    st.refused += 1;
                    continue 'attempts;
                }
                Err(e) => return Err(format!("send {size} bytes to {}: {e}", o.target)),
            }
            let sent_at = Instant::now();
            let deadline = sent_at + o.timeout;
            // Bounded: each pass either returns a datagram, times out, or fails; the deadline
            // ends the loop.
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                sock.set_read_timeout(Some(deadline - now))
                    .map_err(|e| format!("set timeout: {e}"))?;
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        st.replies += 1;
                        let got = &buf[..n];
                        if got == p.as_slice() {
                            let rtt = sent_at.elapsed();
                            st.rtt_sum += rtt;
                            st.rtt_max = st.rtt_max.max(rtt);
                            st.bytes += n as u64;
                            delivered = true;
                            break 'attempts;
                        } else if recent.iter().any(|r| r.as_slice() == got) {
                            st.stale += 1;
                        } else {
                            st.mismatched += 1;
                            if !o.quiet {
                                eprintln!(
                                    "datagram {seq}: sent {size} bytes, got {n} bytes that differ \
                                     (first difference at byte {})",
                                    p.iter()
                                        .zip(got)
                                        .position(|(a, b)| a != b)
                                        .unwrap_or(n.min(size))
                                );
                            }
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        st.refused += 1;
                        break;
                    }
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
        }
        if delivered {
            st.ok += 1;
        } else {
            st.lost += 1;
            if !o.quiet && !o.expect_silence {
                eprintln!(
                    "datagram {seq} ({size} bytes): no intact echo after {} tries",
                    o.retries + 1
                );
            }
        }
        recent.push_back(p);
        if recent.len() > 64 {
            recent.pop_front();
        }
    }

    let avg_ms = if st.ok > 0 {
        st.rtt_sum.as_secs_f64() * 1000.0 / f64::from(st.ok)
    } else {
        0.0
    };
    println!(
        "udp-check {}: sent={} ok={} lost={} mismatched={} stale={} refused={} retransmits={} \
         bytes={} rtt_avg_ms={avg_ms:.3} rtt_max_ms={:.3} elapsed_s={:.2}",
        o.target,
        o.count,
        st.ok,
        st.lost,
        st.mismatched,
        st.stale,
        st.refused,
        st.retransmits,
        st.bytes,
        st.rtt_max.as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64()
    );
    let pass = if o.expect_silence {
        st.replies == 0
    } else {
        st.ok == o.count && st.mismatched == 0
    };
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_a_permutation_starting_with_max() {
        for max in [1usize, 2, 7, 1232, 1000] {
            let mut seen: Vec<usize> = (0..max as u32).map(|s| size_of(s, max)).collect();
            assert_eq!(seen[0], max);
            seen.sort_unstable();
            assert_eq!(seen, (1..=max).collect::<Vec<_>>());
        }
    }

    #[test]
    fn payloads_are_distinct_and_sized() {
        let a = payload(1, 42, 100, None);
        let b = payload(2, 42, 100, None);
        assert_eq!(a.len(), 100);
        assert_ne!(a, b);
        let f = payload(3, 42, 60, Some(b"MARKER"));
        assert_eq!(f.len(), 60);
        assert!(f.windows(6).any(|w| w == b"MARKER"));
        assert_eq!(payload(5, 1, 1, None), vec![5]);
    }
}
