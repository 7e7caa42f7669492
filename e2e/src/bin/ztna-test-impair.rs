//! `ztna-test-impair --listen ADDR --target ADDR [--delay-ms N] [--jitter-ms N] [--reorder-pct N]
//! [--reorder-extra-ms N] [--loss-pct N] [--queue N] [--max-clients N] [--seed N]
//! [--exit-after SECS]`: a UDP impairment forwarder for the end-to-end tests, since this kernel
//! has no netem.
//!
//! Datagrams arriving on `--listen` from a client are sent to `--target` from a socket of that
//! client's own (at most `--max-clients`, default 16), and the target's answers go back to the
//! client from `--listen`. Each datagram, in either direction, is held for `--delay-ms` plus a
//! uniform jitter in `[0, --jitter-ms]`, but never released before the datagram queued ahead of
//! it towards the same address (jitter alone does not reorder, as on a real path); with
//! probability `--reorder-pct`% it is instead held `--reorder-extra-ms` (default 2 × delay + 1)
//! longer, so later datagrams overtake it; with probability `--loss-pct`% it is dropped. At most `--queue` datagrams (default 4096) wait at
//! once; beyond that new ones are dropped (tail drop). It prints its counters every 10 s and
//! exits by itself after `--exit-after` seconds (default 600).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: ztna-test-impair --listen ADDR --target ADDR [--delay-ms N] \
[--jitter-ms N] [--reorder-pct N] [--reorder-extra-ms N] [--loss-pct N] [--queue N] \
[--max-clients N] [--seed N] [--exit-after SECS]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztna-test-impair: {e}");
            ExitCode::from(2)
        }
    }
}

struct Opts {
    listen: SocketAddr,
    target: SocketAddr,
    delay: Duration,
    jitter_ms: u64,
    reorder_pct: u64,
    reorder_extra: Duration,
    loss_pct: u64,
    queue: usize,
    max_clients: usize,
    seed: u64,
    exit_after: Duration,
}

fn parse() -> Result<Opts, String> {
    let mut listen = None;
    let mut target = None;
    let (mut delay_ms, mut jitter_ms, mut reorder_pct, mut loss_pct) = (0u64, 0u64, 0u64, 0u64);
    let mut reorder_extra_ms = None;
    let (mut queue, mut max_clients, mut exit_after) = (4096usize, 16usize, 600u64);
    let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Err(USAGE.to_owned());
        }
        let v = args
            .next()
            .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))?;
        let num = || v.parse::<u64>().map_err(|_| format!("bad {arg} {v:?}"));
        match arg.as_str() {
            "--listen" => listen = Some(v.parse().map_err(|_| format!("bad --listen {v:?}"))?),
            "--target" => target = Some(v.parse().map_err(|_| format!("bad --target {v:?}"))?),
            "--delay-ms" => delay_ms = num()?,
            "--jitter-ms" => jitter_ms = num()?,
            "--reorder-pct" => reorder_pct = num()?.min(100),
            "--reorder-extra-ms" => reorder_extra_ms = Some(num()?),
            "--loss-pct" => loss_pct = num()?.min(100),
            "--queue" => queue = usize::try_from(num()?).map_err(|e| e.to_string())?,
            "--max-clients" => max_clients = usize::try_from(num()?).map_err(|e| e.to_string())?,
            "--seed" => seed = num()?,
            "--exit-after" => exit_after = num()?,
            _ => return Err(format!("unknown option {arg:?}\n{USAGE}")),
        }
    }
    Ok(Opts {
        listen: listen.ok_or(USAGE)?,
        target: target.ok_or(USAGE)?,
        delay: Duration::from_millis(delay_ms),
        jitter_ms,
        reorder_pct,
        reorder_extra: Duration::from_millis(reorder_extra_ms.unwrap_or(2 * delay_ms + 1)),
        loss_pct,
        queue: queue.max(1),
        max_clients: max_clients.max(1),
        seed: seed.max(1),
        exit_after: Duration::from_secs(exit_after),
    })
}

/// xorshift64*: enough randomness for impairment decisions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// A datagram waiting for its release time.
struct Held {
    due: Instant,
    seq: u64,
    via: Arc<UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    lost: AtomicU64,
    reordered: AtomicU64,
    queue_full: AtomicU64,
    send_errors: AtomicU64,
}

/// The queue and what decides a datagram's fate.
struct State {
    heap: BinaryHeap<Reverse<Held>>,
    rng: Rng,
    seq: u64,
    /// Release time of the last in-order datagram towards each address.
    last_due: HashMap<SocketAddr, Instant>,
}

struct Shared {
    opts: Opts,
    queue: Mutex<State>,
    ready: Condvar,
    stop: AtomicBool,
    counters: Counters,
}

impl Shared {
    /// Decides the fate of one datagram and queues it.
    fn submit(&self, via: &Arc<UdpSocket>, to: SocketAddr, data: &[u8]) {
        let o = &self.opts;
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        let State {
            heap,
            rng,
            seq,
            last_due,
        } = &mut *q;
        if rng.below(100) < o.loss_pct {
            self.counters.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if heap.len() >= o.queue {
            self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let mut due = now + o.delay + Duration::from_millis(rng.below(o.jitter_ms + 1));
        if rng.below(100) < o.reorder_pct {
            due += o.reorder_extra;
            self.counters.reordered.fetch_add(1, Ordering::Relaxed);
        } else {
            if last_due.len() > 4 * o.max_clients {
                last_due.retain(|_, t| *t > now);
            }
            let last = last_due.entry(to).or_insert(due);
            due = due.max(*last);
            *last = due;
        }
        *seq += 1;
        heap.push(Reverse(Held {
            due,
            seq: *seq,
            via: Arc::clone(via),
            to,
            data: data.to_vec(),
        }));
        drop(q);
        self.ready.notify_one();
    }
}

fn run() -> Result<(), String> {
    let opts = parse()?;
    let listen =
        Arc::new(UdpSocket::bind(opts.listen).map_err(|e| format!("bind {}: {e}", opts.listen))?);
    listen
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let seed = opts.seed;
    let exit_after = opts.exit_after;
    eprintln!(
        "ztna-test-impair: {} -> {}, delay {:?} jitter {} ms reorder {}% (+{:?}) loss {}% \
         queue {}",
        opts.listen,
        opts.target,
        opts.delay,
        opts.jitter_ms,
        opts.reorder_pct,
        opts.reorder_extra,
        opts.loss_pct,
        opts.queue
    );
    let shared = Arc::new(Shared {
        opts,
        queue: Mutex::new(State {
            heap: BinaryHeap::new(),
            rng: Rng(seed),
            seq: 0,
            last_due: HashMap::new(),
        }),
        ready: Condvar::new(),
        stop: AtomicBool::new(false),
        counters: Counters::default(),
    });

    let sender = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || send_loop(&shared))
    };
    let receiver = {
        let shared = Arc::clone(&shared);
        let listen = Arc::clone(&listen);
        std::thread::spawn(move || client_loop(&shared, &listen))
    };

    let start = Instant::now();
    let mut last_report = start;
    while start.elapsed() < exit_after {
        std::thread::sleep(Duration::from_millis(200).min(exit_after - start.elapsed()));
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            report(&shared.counters, "after", start.elapsed());
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    shared.ready.notify_all();
    let _ = receiver.join();
    let _ = sender.join();
    report(&shared.counters, "exiting after", exit_after);
    Ok(())
}

fn report(c: &Counters, what: &str, t: Duration) {
    eprintln!(
        "ztna-test-impair: {what} {} s: forwarded={} lost={} reordered={} queue_full={} \
         send_errors={}",
        t.as_secs(),
        c.forwarded.load(Ordering::Relaxed),
        c.lost.load(Ordering::Relaxed),
        c.reordered.load(Ordering::Relaxed),
        c.queue_full.load(Ordering::Relaxed),
        c.send_errors.load(Ordering::Relaxed)
    );
}

/// Receives from clients on the listening socket and queues their datagrams towards the
/// target, through one upstream socket per client (whose answers a thread of its own queues
/// back).
fn client_loop(shared: &Arc<Shared>, listen: &Arc<UdpSocket>) {
    let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        let (n, from) = match listen.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                eprintln!("ztna-test-impair: recv: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let up = match upstream.get(&from) {
            Some(s) => Arc::clone(s),
            None => {
                if upstream.len() >= shared.opts.max_clients {
                    continue;
                }
                let bind: SocketAddr = if shared.opts.target.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let Ok(s) = UdpSocket::bind(bind) else {
                    continue;
                };
                if s.set_read_timeout(Some(Duration::from_millis(100)))
                    .is_err()
                {
                    continue;
                }
                let s = Arc::new(s);
                eprintln!("ztna-test-impair: new client {from}");
                upstream.insert(from, Arc::clone(&s));
                let shared = Arc::clone(shared);
                let listen = Arc::clone(listen);
                let up = Arc::clone(&s);
                std::thread::spawn(move || upstream_loop(&shared, &up, &listen, from));
                s
            }
        };
        shared.submit(&up, shared.opts.target, &buf[..n]);
    }
}

/// Queues the target's answers on one client's upstream socket back to that client.
fn upstream_loop(shared: &Shared, up: &UdpSocket, listen: &Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        match up.recv_from(&mut buf) {
            Ok((n, from)) if from == shared.opts.target => shared.submit(listen, client, &buf[..n]),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Sends queued datagrams when they are due.
fn send_loop(shared: &Shared) {
    let Ok(mut q) = shared.queue.lock() else {
        return;
    };
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = match q.heap.peek() {
            Some(Reverse(h)) if h.due <= now => None,
            Some(Reverse(h)) => Some(h.due - now),
            None => Some(Duration::from_millis(100)),
        };
        if let Some(w) = wait {
            q = match shared.ready.wait_timeout(q, w) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
            continue;
        }
        let Some(Reverse(h)) = q.heap.pop() else {
            continue;
        };
        drop(q);
        match h.via.send_to(&h.data, h.to) {
            Ok(_) => shared.counters.forwarded.fetch_add(1, Ordering::Relaxed),
            Err(_) => shared.counters.send_errors.fetch_add(1, Ordering::Relaxed),
        };
        q = match shared.queue.lock() {
            Ok(g) => g,
            Err(_) => return,
        };
    }
}
