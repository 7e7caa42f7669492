//! `ztna-test-udp-flows TARGET --flows N [--hold-secs S] [--timeout-ms MS] [--rounds R]`: opens N
//! UDP sockets (N distinct source ports, so N flows through the connector), sends one datagram
//! from each to TARGET (an echo server), and waits for every echo, re-sending to the flows still
//! unanswered for up to R rounds. Prints `flows=N answered=M` and, with `--hold-secs`, keeps the
//! sockets open that long afterwards (so the flows stay open while a test counts file
//! descriptors). Exits 0 when every flow was answered, 1 otherwise, 2 on usage or socket errors.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: ztna-test-udp-flows TARGET --flows N [--hold-secs S] [--timeout-ms MS] [--rounds R]";

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ztna-test-udp-flows: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn num<T: std::str::FromStr>(s: Option<String>, name: &str) -> Result<T, String> {
    let s = s.ok_or(format!("{name} needs a value"))?;
    s.parse().map_err(|_| format!("bad {name} {s:?}"))
}

fn raise_nofile(want: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.max(want as libc::rlim_t);
            lim.rlim_max = lim.rlim_max.max(lim.rlim_cur);
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn run() -> Result<bool, String> {
    let mut target: Option<SocketAddr> = None;
    let (mut flows, mut hold, mut timeout_ms, mut rounds) = (100usize, 0u64, 2000u64, 5u32);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--flows" => flows = num(args.next(), "--flows")?,
            "--hold-secs" => hold = num(args.next(), "--hold-secs")?,
            "--timeout-ms" => timeout_ms = num(args.next(), "--timeout-ms")?,
            "--rounds" => rounds = num(args.next(), "--rounds")?,
            a if a.starts_with('-') => return Err(format!("unknown option {a}")),
            a => target = Some(a.parse().map_err(|_| format!("bad target {a:?}"))?),
        }
    }
    let target = target.ok_or("missing TARGET")?;
    raise_nofile(flows + 64);
    let mut sockets = Vec::with_capacity(flows);
    for _ in 0..flows {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
        s.connect(target).map_err(|e| format!("connect: {e}"))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        sockets.push(s);
    }
    let mut answered = vec![false; flows];
    let mut buf = [0u8; 2048];
    for round in 0..rounds.max(1) {
        // Send from every unanswered flow, in small bursts so the tunnel's queues keep up.
        for (i, s) in sockets.iter().enumerate() {
            if !answered[i] {
                let _ = s.send(format!("flow {i} round {round}").as_bytes());
                if i % 100 == 99 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        while Instant::now() < deadline && answered.iter().any(|a| !a) {
            let mut got = false;
            for (i, s) in sockets.iter().enumerate() {
                while let Ok(n) = s.recv(&mut buf) {
                    let want = format!("flow {i} round ");
                    if buf[..n].windows(want.len()).any(|w| w == want.as_bytes()) {
                        answered[i] = true;
                        got = true;
                    }
                }
            }
            if !got {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if answered.iter().all(|a| *a) {
            break;
        }
    }
    let ok = answered.iter().filter(|a| **a).count();
    println!("flows={flows} answered={ok}");
    std::thread::sleep(Duration::from_secs(hold));
    Ok(ok == flows)
}
