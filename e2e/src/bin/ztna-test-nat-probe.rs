//! `ztna-test-nat-probe`: a tiny STUN-like UDP probe for the NAT tests (`e2e/tests/nat.rs`).
//!
//! ```text
//! ztna-test-nat-probe serve --bind IP:PORT [--bind IP:PORT] [--peer IP:PORT] [--hello IP:PORT]
//!                           [--for-secs N]
//! ztna-test-nat-probe probe --bind IP:PORT --to IP:PORT [--to IP:PORT ...] [--filter]
//!                           [--wait-ms N] [--ttl N] [--connect]
//! ```
//!
//! `serve` answers on every bound socket: `ECHO n` gets `SEEN n SRC` back from the same socket
//! (SRC = the source address it saw, i.e. the NAT mapping). `PROBE n` gets the same answer and,
//! in addition, `ALT n` to SRC from the server's other bound socket (same address, other port)
//! and `FWD n SRC` to `--peer`, which then sends `PEER n` to SRC from the socket the FWD arrived
//! on (another address). With `--hello T`, each socket first sends `HELLO` to T (to open a NAT
//! mapping for a server behind a NAT). It runs for `--for-secs` (default 60).
//!
//! `probe` sends `ECHO` (or, with `--filter`, `PROBE`) from one socket to every `--to` target,
//! resending every 200 ms until answered, and listens for `--wait-ms` (default 1000; with
//! `--filter` it always listens that long unless SEEN, ALT and PEER all arrived). It prints one
//! line per result: `SEEN TARGET SRC` or `NOSEEN TARGET`, and `ALT FROM` / `PEER FROM` for every
//! distinct sender of those. `--ttl N` sends with that IP TTL. `--connect` (one target) uses a
//! connected socket, which learns of an ICMP port unreachable: then it prints `REFUSED TARGET`
//! too. Exit 0 unless arguments or sockets fail (2).

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: ztna-test-nat-probe serve --bind IP:PORT [--bind IP:PORT] \
[--peer IP:PORT] [--hello IP:PORT] [--for-secs N] | probe --bind IP:PORT --to IP:PORT... \
[--filter] [--wait-ms N] [--ttl N] [--connect]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("probe") => probe(&args[1..]),
        _ => Err(USAGE.to_owned()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztna-test-nat-probe: {e}");
            ExitCode::from(2)
        }
    }
}

#[derive(Default)]
struct Opts {
    bind: Vec<SocketAddr>,
    to: Vec<SocketAddr>,
    peer: Option<SocketAddr>,
    hello: Option<SocketAddr>,
    for_secs: u64,
    wait_ms: u64,
    filter: bool,
    ttl: Option<u32>,
    connect: bool,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        for_secs: 60,
        wait_ms: 1000,
        ..Opts::default()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--filter" {
            o.filter = true;
            continue;
        }
        if a == "--connect" {
            o.connect = true;
            continue;
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        let addr = || v.parse::<SocketAddr>().map_err(|e| format!("{a} {v}: {e}"));
        let num = || v.parse::<u64>().map_err(|e| format!("{a} {v}: {e}"));
        match a.as_str() {
            "--bind" => o.bind.push(addr()?),
            "--to" => o.to.push(addr()?),
            "--peer" => o.peer = Some(addr()?),
            "--hello" => o.hello = Some(addr()?),
            "--for-secs" => o.for_secs = num()?,
            "--wait-ms" => o.wait_ms = num()?,
            "--ttl" => o.ttl = Some(u32::try_from(num()?).map_err(|e| format!("--ttl: {e}"))?),
            _ => return Err(format!("unknown option {a}\n{USAGE}")),
        }
    }
    Ok(o)
}

fn bind(addr: SocketAddr) -> Result<UdpSocket, String> {
    let s = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    Ok(s)
}

/// Receives one datagram (or times out after the socket's read timeout).
fn recv(s: &UdpSocket) -> Option<(String, SocketAddr)> {
    let mut buf = [0u8; 512];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from)),
        Err(_) => None,
    }
}

fn send(s: &UdpSocket, msg: &str, to: SocketAddr) {
    if let Err(e) = s.send_to(msg.as_bytes(), to) {
        eprintln!("send {msg:?} to {to}: {e}");
    }
}

fn serve(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    if o.bind.is_empty() {
        return Err(format!("serve needs --bind\n{USAGE}"));
    }
    let socks = o
        .bind
        .iter()
        .map(|a| bind(*a))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(h) = o.hello {
        for s in &socks {
            send(s, "HELLO", h);
        }
    }
    eprintln!("serving on {:?}", o.bind);
    let end = Instant::now() + Duration::from_secs(o.for_secs);
    while Instant::now() < end {
        for (i, s) in socks.iter().enumerate() {
            let Some((msg, from)) = recv(s) else { continue };
            let mut words = msg.split_whitespace();
            let (kind, n) = (words.next().unwrap_or(""), words.next().unwrap_or("0"));
            match kind {
                "ECHO" | "PROBE" => {
                    send(s, &format!("SEEN {n} {from}"), from);
                    if kind == "PROBE" {
                        if let Some(other) = socks.get(if i == 0 { 1 } else { 0 }) {
                            send(other, &format!("ALT {n}"), from);
                        }
                        if let Some(peer) = o.peer {
                            send(s, &format!("FWD {n} {from}"), peer);
                        }
                    }
                }
                "FWD" => {
                    if let Some(Ok(target)) = words.next().map(str::parse::<SocketAddr>) {
                        send(s, &format!("PEER {n}"), target);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn probe(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let (Some(&local), false) = (o.bind.first(), o.to.is_empty()) else {
        return Err(format!("probe needs --bind and --to\n{USAGE}"));
    };
    let s = bind(local)?;
    if let Some(ttl) = o.ttl {
        s.set_ttl(ttl).map_err(|e| format!("set_ttl: {e}"))?;
    }
    if o.connect {
        if o.to.len() != 1 {
            return Err(format!("--connect takes one --to\n{USAGE}"));
        }
        s.connect(o.to[0]).map_err(|e| format!("connect: {e}"))?;
    }
    let mut refused = false;
    let kind = if o.filter { "PROBE" } else { "ECHO" };
    let mut seen: Vec<Option<String>> = vec![None; o.to.len()];
    let (mut alt, mut peer) = (BTreeSet::new(), BTreeSet::new());
    let start = Instant::now();
    let end = start + Duration::from_millis(o.wait_ms);
    let mut next_send = start;
    while Instant::now() < end {
        if Instant::now() >= next_send {
            for (i, to) in o.to.iter().enumerate() {
                if seen[i].is_none() {
                    // A connected socket reports a pending ICMP error on the next call, which
                    // may be this one.
                    match s.send_to(format!("{kind} {i}").as_bytes(), to) {
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            refused = true
                        }
                        Err(e) => eprintln!("send to {to}: {e}"),
                        Ok(_) => {}
                    }
                }
            }
            next_send = Instant::now() + Duration::from_millis(200);
        }
        let got = if o.connect {
            let mut buf = [0u8; 512];
            match s.recv(&mut buf) {
                Ok(n) => Some((String::from_utf8_lossy(&buf[..n]).into_owned(), o.to[0])),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    refused = true;
                    None
                }
                Err(_) => None,
            }
        } else {
            recv(&s)
        };
        if let Some((msg, from)) = got {
            let w: Vec<&str> = msg.split_whitespace().collect();
            match w.as_slice() {
                ["SEEN", n, src] => {
                    if let Some(slot) = n.parse::<usize>().ok().and_then(|i| seen.get_mut(i)) {
                        if o.to.get(n.parse::<usize>().unwrap_or(usize::MAX)) == Some(&from) {
                            *slot = Some((*src).to_owned());
                        }
                    }
                }
                ["ALT", ..] => {
                    alt.insert(from);
                }
                ["PEER", ..] => {
                    peer.insert(from);
                }
                _ => {}
            }
        }
        let all_seen = seen.iter().all(Option::is_some);
        if all_seen && (!o.filter || (!alt.is_empty() && !peer.is_empty())) {
            break;
        }
    }
    for (to, src) in o.to.iter().zip(&seen) {
        match src {
            Some(src) => println!("SEEN {to} {src}"),
            None => println!("NOSEEN {to}"),
        }
    }
    if refused {
        println!("REFUSED {}", o.to[0]);
    }
    for a in &alt {
        println!("ALT {a}");
    }
    for p in &peer {
        println!("PEER {p}");
    }
    Ok(())
}
