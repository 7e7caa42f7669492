//! `ztna-test-tcp MODE ...`: small TCP clients and a server for the end-to-end tests (std only).
//!
//! - `listen ADDR [--echo] [--exit-after SECS]`: accepts connections (a thread each) and reads
//!   each to EOF, echoing what it reads with `--echo`, discarding it otherwise.
//! - `hold ADDR --count N [--hold-secs SECS] [--timeout-ms MS]`: opens N connections to an
//!   echoing server, checks each with a one-byte round trip, prints `held N ...`, keeps them open
//!   for SECS (default 600) and exits (closing them all).
//! - `send ADDR --file F [--timeout-secs SECS]`: connects, writes F, shuts down its write side
//!   (half-close), reads the answer to EOF and prints it on stdout.
//! - `read ADDR [--timeout-secs SECS]`: connects, sends nothing and reads to EOF; prints
//!   `result=eof bytes=N ms=T` (the server closed), or `result=KIND ms=T` on an error.
//! - `connect ADDR [--timeout-ms MS]`: connects and waits up to MS for the server to send or
//!   close; prints `result=refused|reset|timeout|connected|eof|error:... ms=T`.
//! - `rtt ADDR --count N [--interval-ms MS] [--timeout-ms MS]`: one connection to an echoing
//!   server; every MS (default 100) writes one byte and waits for it to come back, N times; prints
//!   `rtt_ms=R` per round trip and `result=done sent=N received=M`. A round trip that takes longer
//!   than the timeout (default 2000) ends the probe (`result=timeout`). A TCP ping: it measures
//!   what a small request waits behind other traffic on the same path.
//!
//! Every mode is bounded in time. Exit status: 0 when the mode ran (its `result=` line says how),
//! 2 on a usage error, 1 when `hold` or `send` failed.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: ztna-test-tcp listen ADDR [--echo] [--exit-after SECS] | \
hold ADDR --count N [--hold-secs SECS] [--timeout-ms MS] | \
send ADDR --file F [--timeout-secs SECS] | read ADDR [--timeout-secs SECS] | \
connect ADDR [--timeout-ms MS] | \
rtt ADDR --count N [--interval-ms MS] [--timeout-ms MS]";

fn main() -> ExitCode {
    raise_nofile();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("ztna-test-tcp: {e}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("ztna-test-tcp: {e}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Failed(String),
}

fn usage(s: impl Into<String>) -> Failure {
    Failure::Usage(s.into())
}

fn failed(s: impl Into<String>) -> Failure {
    Failure::Failed(s.into())
}

/// Lifts the soft limit of open files to the hard limit (holding 1000 connections needs it).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

struct Args {
    addr: SocketAddr,
    echo: bool,
    count: usize,
    secs: Option<u64>,
    timeout_ms: Option<u64>,
    interval_ms: Option<u64>,
    file: Option<String>,
}

fn run() -> Result<(), Failure> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or_else(|| usage("no mode"))?;
    let addr = it.next().ok_or_else(|| usage("no address"))?;
    let mut a = Args {
        addr: addr
            .parse()
            .map_err(|_| usage(format!("bad address {addr:?}")))?,
        echo: false,
        count: 0,
        secs: None,
        timeout_ms: None,
        interval_ms: None,
        file: None,
    };
    while let Some(opt) = it.next() {
        if opt == "--echo" {
            a.echo = true;
            continue;
        }
        let v = it
            .next()
            .ok_or_else(|| usage(format!("{opt} needs a value")))?;
        let num = || {
            v.parse::<u64>()
                .map_err(|_| usage(format!("bad {opt} {v:?}")))
        };
        match opt.as_str() {
            "--count" => a.count = usize::try_from(num()?).map_err(|e| usage(e.to_string()))?,
            "--exit-after" | "--hold-secs" | "--timeout-secs" => a.secs = Some(num()?),
            "--timeout-ms" => a.timeout_ms = Some(num()?),
            "--interval-ms" => a.interval_ms = Some(num()?),
            "--file" => a.file = Some(v.clone()),
            _ => return Err(usage(format!("unknown option {opt:?}"))),
        }
    }
    match mode.as_str() {
        "listen" => listen(&a),
        "hold" => hold(&a),
        "send" => send(&a),
        "read" => read(&a),
        "connect" => connect(&a),
        "rtt" => rtt(&a),
        m => Err(usage(format!("unknown mode {m:?}"))),
    }
}

fn ms(since: Instant) -> u128 {
    since.elapsed().as_millis()
}

/// The name of an I/O error as the tests match it.
fn kind(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused".to_owned(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "reset".to_owned(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout".to_owned(),
        _ => format!("error:{}", e.to_string().replace(' ', "_")),
    }
}

fn listen(a: &Args) -> Result<(), Failure> {
    let l = TcpListener::bind(a.addr).map_err(|e| failed(format!("bind {}: {e}", a.addr)))?;
    l.set_nonblocking(true).map_err(|e| failed(e.to_string()))?;
    let limit = Duration::from_secs(a.secs.unwrap_or(900));
    eprintln!(
        "ztna-test-tcp: listening on {} ({})",
        a.addr,
        if a.echo { "echo" } else { "discard" }
    );
    let start = Instant::now();
    let mut accepted = 0u64;
    while start.elapsed() < limit {
        match l.accept() {
            Ok((s, _)) => {
                accepted += 1;
                let echo = a.echo;
                let left = limit.saturating_sub(start.elapsed());
                let spawned = std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || serve(s, echo, left));
                if let Err(e) = spawned {
                    eprintln!("ztna-test-tcp: no thread for connection {accepted}: {e}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                eprintln!("ztna-test-tcp: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    eprintln!(
        "ztna-test-tcp: exiting after {} s, accepted {accepted}",
        limit.as_secs()
    );
    Ok(())
}

fn serve(mut s: TcpStream, echo: bool, limit: Duration) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(limit.max(Duration::from_secs(1))));
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if echo && s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn hold(a: &Args) -> Result<(), Failure> {
    if a.count == 0 {
        return Err(usage("hold needs --count N"));
    }
    let timeout = Duration::from_millis(a.timeout_ms.unwrap_or(10_000));
    let start = Instant::now();
    let mut conns = Vec::with_capacity(a.count);
    for i in 0..a.count {
        let mut s = TcpStream::connect_timeout(&a.addr, timeout)
            .map_err(|e| failed(format!("connection {i} of {}: {}", a.count, kind(&e))))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| failed(e.to_string()))?;
        s.write_all(b"x")
            .map_err(|e| failed(format!("writing on connection {i}: {}", kind(&e))))?;
        conns.push(s);
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .map_err(|e| failed(format!("reading on connection {i}: {}", kind(&e))))?;
        if b[0] != b'x' {
            return Err(failed(format!("connection {i} echoed {:?}", b[0])));
        }
    }
    println!("held {} ms={}", conns.len(), ms(start));
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(a.secs.unwrap_or(600)));
    println!("closing {}", conns.len());
    Ok(())
}

fn send(a: &Args) -> Result<(), Failure> {
    let file = a
        .file
        .as_deref()
        .ok_or_else(|| usage("send needs --file F"))?;
    let data = std::fs::read(file).map_err(|e| failed(format!("reading {file}: {e}")))?;
    let limit = Duration::from_secs(a.secs.unwrap_or(30));
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&a.addr, limit)
        .map_err(|e| failed(format!("connect: {}", kind(&e))))?;
    s.set_read_timeout(Some(limit))
        .and_then(|()| s.set_write_timeout(Some(limit)))
        .map_err(|e| failed(e.to_string()))?;
    s.write_all(&data)
        .map_err(|e| failed(format!("write: {}", kind(&e))))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| failed(format!("shutdown(Write): {e}")))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        if start.elapsed() > limit {
            return Err(failed(format!(
                "no EOF within {} s after {} bytes",
                limit.as_secs(),
                answer.len()
            )));
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => {
                return Err(failed(format!(
                    "read after half-close: {} after {} bytes",
                    kind(&e),
                    answer.len()
                )))
            }
        }
    }
    std::io::stdout()
        .write_all(&answer)
        .map_err(|e| failed(e.to_string()))?;
    eprintln!(
        "result=eof sent={} received={} ms={}",
        data.len(),
        answer.len(),
        ms(start)
    );
    Ok(())
}

fn read(a: &Args) -> Result<(), Failure> {
    let limit = Duration::from_secs(a.secs.unwrap_or(10));
    let start = Instant::now();
    let mut s = match TcpStream::connect_timeout(&a.addr, limit) {
        Ok(s) => s,
        Err(e) => {
            println!("result=connect-{} ms={}", kind(&e), ms(start));
            return Ok(());
        }
    };
    let mut total = 0usize;
    let mut buf = [0u8; 16384];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            println!("result=timeout bytes={total} ms={}", ms(start));
            return Ok(());
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| failed(e.to_string()))?;
        match s.read(&mut buf) {
            Ok(0) => {
                println!("result=eof bytes={total} ms={}", ms(start));
                return Ok(());
            }
            Ok(n) => total += n,
            Err(e) => {
                println!("result={} bytes={total} ms={}", kind(&e), ms(start));
                return Ok(());
            }
        }
    }
}

fn connect(a: &Args) -> Result<(), Failure> {
    let limit = Duration::from_millis(a.timeout_ms.unwrap_or(5000));
    let start = Instant::now();
    let mut s = match TcpStream::connect_timeout(&a.addr, limit) {
        Ok(s) => s,
        Err(e) => {
            println!("result={} ms={}", kind(&e), ms(start));
            return Ok(());
        }
    };
    let connected_ms = ms(start);
    let left = limit.saturating_sub(start.elapsed());
    if left.is_zero() {
        println!("result=connected ms={connected_ms}");
        return Ok(());
    }
    s.set_read_timeout(Some(left))
        .map_err(|e| failed(e.to_string()))?;
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        Ok(0) => println!("result=eof connected_ms={connected_ms} ms={}", ms(start)),
        Ok(n) => println!(
            "result=connected data={n} connected_ms={connected_ms} ms={}",
            ms(start)
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            println!(
                "result=connected connected_ms={connected_ms} ms={}",
                ms(start)
            )
        }
        Err(e) => println!(
            "result={} connected_ms={connected_ms} ms={}",
            kind(&e),
            ms(start)
        ),
    }
    Ok(())
}

fn rtt(a: &Args) -> Result<(), Failure> {
    if a.count == 0 {
        return Err(usage("rtt needs --count N"));
    }
    let timeout = Duration::from_millis(a.timeout_ms.unwrap_or(2000).max(1));
    let interval = Duration::from_millis(a.interval_ms.unwrap_or(100));
    let mut s = TcpStream::connect_timeout(&a.addr, timeout)
        .map_err(|e| failed(format!("connect: {}", kind(&e))))?;
    s.set_nodelay(true)
        .and_then(|()| s.set_read_timeout(Some(timeout)))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| failed(e.to_string()))?;
    let mut received = 0usize;
    let mut next = Instant::now();
    for _ in 0..a.count {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += interval;
        let sent = Instant::now();
        let mut b = [b'r'];
        let round = s.write_all(&b).and_then(|()| s.read_exact(&mut b));
        match round {
            Ok(()) => {
                received += 1;
                println!("rtt_ms={:.3}", sent.elapsed().as_secs_f64() * 1e3);
            }
            Err(e) => {
                println!(
                    "result={} sent={} received={received}",
                    kind(&e),
                    received + 1
                );
                return Ok(());
            }
        }
        // A round trip longer than the interval delays the next one; don't send a burst after.
        next = next.max(Instant::now());
    }
    println!("result=done sent={} received={received}", a.count);
    Ok(())
}
