//! `ztna-test-impair --listen ADDR --target ADDR [IMPAIRMENT...] [--max-clients N] [--seed N]
//! [--exit-after SECS] [--control-file PATH] [--stats-file PATH]`: a UDP impairment forwarder
//! for the end-to-end tests and the benchmarks, since this kernel has no netem.
//!
//! Datagrams arriving on `--listen` from a client are sent to `--target` from a socket of that
//! client's own (at most `--max-clients`, default 16), and the target's answers go back to the
//! client from `--listen`. `--listen` and `--target` may be given again, in pairs (the n-th
//! `--listen` forwards to the n-th `--target`): two tunnels through one forwarder share its
//! impairment, its bottleneck included. The impairment, applied to each direction alike:
//!
//! - `--loss-pct P` (decimals allowed): the datagram is dropped with probability P %.
//! - `--rate-mbit R` with `--rate-queue-kb Q` (default 64): a bottleneck link of R Mbit/s each
//!   way, shared by every datagram going that way (towards the targets, or towards the
//!   clients), with a tail-drop FIFO of Q KiB in front of it: each datagram leaves the link when the ones before
//!   it have, plus its own serialisation time; when Q KiB already wait, it is dropped.
//! - `--delay-ms D` plus a uniform `--jitter-ms J`: held that much longer (one-way), but never
//!   released before the datagram queued ahead of it towards the same address (jitter alone does
//!   not reorder, as on a real path).
//! - `--reorder-pct P` (decimals allowed): instead held `--reorder-extra-ms` (default
//!   2 × delay + 1) longer, so later datagrams overtake it.
//! - `--queue N` (default 4096): at most N datagrams wait in the forwarder at once; beyond that
//!   new ones are dropped.
//!
//! Every socket asks for [`SOCKET_BUFFER`] bytes of kernel buffer each way: with the default
//! 208 KiB, bursts of a tunnel that sends with GSO (quinn) overflowed the forwarder's own
//! receive buffer whenever its thread was descheduled, and the forwarder, not the path, lost
//! 8 % of a download at 150 ms. What the kernel still drops on its sockets is counted
//! (`socket_drops`, from `/proc/self/net/udp`), so a measurement the forwarder spoilt shows it.
//!
//! `--control-file PATH`: re-read when it changes (checked every 100 ms); its content is a new
//! impairment in the same syntax (`--delay-ms 10 --loss-pct 1`; options not given are reset to
//! their defaults), so a benchmark can change the path under a running tunnel. `--stats-file
//! PATH`: rewritten every 100 ms with the counters since the last impairment change, one
//! `key=value` per line, then `applied=` (impairments read from the control file so far) and
//! `written=` (how many times the file was written), so that a reader can tell that a change
//! took effect and that what it reads is fresh. The counters also go to stderr every 10 s; the
//! forwarder exits by itself after `--exit-after` seconds (default 600).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Kernel buffer asked for on every socket, each way (forced past `net.core.rmem_max` when
/// the forwarder may, as root).
const SOCKET_BUFFER: usize = 16 << 20;

const USAGE: &str = "usage: ztna-test-impair --listen ADDR --target ADDR [--listen ADDR --target ADDR ...] [--delay-ms N] \
[--jitter-ms N] [--reorder-pct P] [--reorder-extra-ms N] [--loss-pct P] [--rate-mbit R] \
[--rate-queue-kb Q] [--queue N] [--max-clients N] [--seed N] [--exit-after SECS] \
[--control-file PATH] [--stats-file PATH]";

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
    /// (listen, target) pairs.
    pairs: Vec<(SocketAddr, SocketAddr)>,
    impair: Impair,
    max_clients: usize,
    seed: u64,
    exit_after: Duration,
    control_file: Option<PathBuf>,
    stats_file: Option<PathBuf>,
}

/// What happens to each datagram; changeable at run time through `--control-file`.
#[derive(Debug, Clone, PartialEq)]
struct Impair {
    delay: Duration,
    jitter_ms: u64,
    /// Probabilities in parts per million.
    reorder_ppm: u64,
    reorder_extra: Duration,
    loss_ppm: u64,
    /// Bottleneck rate in bits per second (0: none) and its queue in bytes.
    rate_bps: u64,
    rate_queue: u64,
    queue: usize,
}

/// A percentage with decimals as parts per million.
fn ppm(v: &str, arg: &str) -> Result<u64, String> {
    let p: f64 = v.parse().map_err(|_| format!("bad {arg} {v:?}"))?;
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{arg} {v:?} is not a percentage"));
    }
    Ok((p * 10_000.0).round() as u64)
}

/// Parses impairment options; any other option goes to `other(arg, value)`.
fn parse_impair(
    args: &mut dyn Iterator<Item = String>,
    mut other: impl FnMut(&str, String) -> Result<(), String>,
) -> Result<Impair, String> {
    let (mut delay_ms, mut jitter_ms, mut reorder_ppm, mut loss_ppm) = (0u64, 0u64, 0u64, 0u64);
    let (mut rate_mbit, mut rate_queue_kb) = (0.0f64, 64u64);
    let mut reorder_extra_ms = None;
    let mut queue = 4096usize;
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Err(USAGE.to_owned());
        }
        let v = args
            .next()
            .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))?;
        let num = || v.parse::<u64>().map_err(|_| format!("bad {arg} {v:?}"));
        match arg.as_str() {
            "--delay-ms" => delay_ms = num()?,
            "--jitter-ms" => jitter_ms = num()?,
            "--reorder-pct" => reorder_ppm = ppm(&v, &arg)?,
            "--reorder-extra-ms" => reorder_extra_ms = Some(num()?),
            "--loss-pct" => loss_ppm = ppm(&v, &arg)?,
            "--rate-mbit" => {
                rate_mbit = v
                    .parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r >= 0.0)
                    .ok_or_else(|| format!("bad {arg} {v:?}"))?
            }
            "--rate-queue-kb" => rate_queue_kb = num()?,
            "--queue" => queue = usize::try_from(num()?).map_err(|e| e.to_string())?,
            _ => other(&arg, v)?,
        }
    }
    Ok(Impair {
        delay: Duration::from_millis(delay_ms),
        jitter_ms,
        reorder_ppm,
        reorder_extra: Duration::from_millis(reorder_extra_ms.unwrap_or(2 * delay_ms + 1)),
        loss_ppm,
        rate_bps: (rate_mbit * 1e6) as u64,
        rate_queue: rate_queue_kb.saturating_mul(1024).max(2048),
        queue: queue.max(1),
    })
}

fn parse() -> Result<Opts, String> {
    let mut listen = Vec::new();
    let mut target = Vec::new();
    let (mut max_clients, mut exit_after) = (16usize, 600u64);
    let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let (mut control_file, mut stats_file) = (None, None);
    let impair = parse_impair(&mut std::env::args().skip(1), |arg, v| {
        let num = || v.parse::<u64>().map_err(|_| format!("bad {arg} {v:?}"));
        match arg {
            "--listen" => listen.push(v.parse().map_err(|_| format!("bad --listen {v:?}"))?),
            "--target" => target.push(v.parse().map_err(|_| format!("bad --target {v:?}"))?),
            "--max-clients" => max_clients = usize::try_from(num()?).map_err(|e| e.to_string())?,
            "--seed" => seed = num()?,
            "--exit-after" => exit_after = num()?,
            "--control-file" => control_file = Some(PathBuf::from(&v)),
            "--stats-file" => stats_file = Some(PathBuf::from(&v)),
            _ => return Err(format!("unknown option {arg:?}\n{USAGE}")),
        }
        Ok(())
    })?;
    if listen.is_empty() || listen.len() != target.len() {
        return Err(format!(
            "give --listen and --target in pairs ({} and {})\n{USAGE}",
            listen.len(),
            target.len()
        ));
    }
    Ok(Opts {
        pairs: listen.into_iter().zip(target).collect(),
        impair,
        max_clients: max_clients.max(1),
        seed: seed.max(1),
        exit_after: Duration::from_secs(exit_after),
        control_file,
        stats_file,
    })
}

/// Reads an impairment from a control file.
fn read_control(path: &Path) -> Result<Impair, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut words = text.split_whitespace().map(str::to_owned);
    parse_impair(&mut words, |arg, _| {
        Err(format!(
            "{}: {arg:?} can't change at run time",
            path.display()
        ))
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
    /// Towards a target (else towards a client).
    up: bool,
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

/// Counters since the start or the last impairment change.
#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    lost: AtomicU64,
    reordered: AtomicU64,
    queue_full: AtomicU64,
    /// Dropped by the bottleneck's full queue (`--rate-mbit`).
    rate_dropped: AtomicU64,
    send_errors: AtomicU64,
    /// Bytes (UDP payloads) that arrived towards the target, and that left towards it.
    up_in_bytes: AtomicU64,
    up_out_bytes: AtomicU64,
    /// Bytes that arrived and left towards the clients.
    down_in_bytes: AtomicU64,
    down_out_bytes: AtomicU64,
    /// The longest the bottleneck queue towards the target got, in microseconds of its rate,
    /// and towards the clients.
    up_max_backlog_us: AtomicU64,
    down_max_backlog_us: AtomicU64,
    /// Datagrams the kernel dropped on the forwarder's own sockets (receive buffer full).
    socket_drops: AtomicU64,
}

impl Counters {
    const NAMES: [&'static str; 13] = [
        "forwarded",
        "lost",
        "reordered",
        "queue_full",
        "rate_dropped",
        "send_errors",
        "up_in_bytes",
        "up_out_bytes",
        "down_in_bytes",
        "down_out_bytes",
        "up_max_backlog_us",
        "down_max_backlog_us",
        "socket_drops",
    ];

    fn all(&self) -> [&AtomicU64; 13] {
        [
            &self.forwarded,
            &self.lost,
            &self.reordered,
            &self.queue_full,
            &self.rate_dropped,
            &self.send_errors,
            &self.up_in_bytes,
            &self.up_out_bytes,
            &self.down_in_bytes,
            &self.down_out_bytes,
            &self.up_max_backlog_us,
            &self.down_max_backlog_us,
            &self.socket_drops,
        ]
    }

    fn reset(&self) {
        for c in self.all() {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// `key=value` lines, or one line joined by spaces.
    fn render(&self, sep: &str) -> String {
        Self::NAMES
            .iter()
            .zip(self.all())
            .map(|(n, c)| format!("{n}={}", c.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(sep)
    }
}

/// The queue and what decides a datagram's fate.
struct State {
    impair: Impair,
    heap: BinaryHeap<Reverse<Held>>,
    rng: Rng,
    seq: u64,
    /// Release time of the last in-order datagram towards each address.
    last_due: HashMap<SocketAddr, Instant>,
    /// When the bottleneck towards the targets, and towards the clients, is free again.
    link_free: [Option<Instant>; 2],
}

struct Shared {
    opts: Opts,
    queue: Mutex<State>,
    ready: Condvar,
    stop: AtomicBool,
    counters: Counters,
    /// Inodes of the forwarder's sockets, to find their drops in `/proc/self/net/udp`.
    sockets: Mutex<Vec<u64>>,
    /// Their drops when the counters were last reset.
    drops_base: AtomicU64,
    /// Impairments read from the control file so far (`applied` in the stats file).
    applied: AtomicU64,
}

impl Shared {
    /// Decides the fate of one datagram and queues it.
    /// `up`: towards a target (else towards a client).
    fn submit(&self, via: &Arc<UdpSocket>, to: SocketAddr, up: bool, data: &[u8]) {
        let c = &self.counters;
        let len = data.len() as u64;
        if up { &c.up_in_bytes } else { &c.down_in_bytes }.fetch_add(len, Ordering::Relaxed);
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        let State {
            impair: o,
            heap,
            rng,
            seq,
            last_due,
            link_free,
        } = &mut *q;
        if rng.below(1_000_000) < o.loss_ppm {
            c.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if heap.len() >= o.queue {
            c.queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let mut leaves = now;
        if o.rate_bps > 0 {
            let free = link_free[usize::from(up)].get_or_insert(now);
            let backlog = free.saturating_duration_since(now);
            // Bytes waiting in front of the link, at its rate.
            let waiting = (backlog.as_secs_f64() * o.rate_bps as f64 / 8.0) as u64;
            if waiting + len > o.rate_queue {
                c.rate_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if up {
                &c.up_max_backlog_us
            } else {
                &c.down_max_backlog_us
            }
            .fetch_max(backlog.as_micros() as u64, Ordering::Relaxed);
            // A 28-byte IPv4 and UDP header on the wire, as on a real link.
            let bits = (len + 28) * 8;
            *free = (*free).max(now) + Duration::from_nanos(bits * 1_000_000_000 / o.rate_bps);
            leaves = *free;
        }
        let mut due = leaves + o.delay + Duration::from_millis(rng.below(o.jitter_ms + 1));
        if rng.below(1_000_000) < o.reorder_ppm {
            due += o.reorder_extra;
            c.reordered.fetch_add(1, Ordering::Relaxed);
        } else {
            if last_due.len() > 4 * self.opts.max_clients {
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
            up,
            data: data.to_vec(),
        }));
        drop(q);
        self.ready.notify_one();
    }

    /// Asks for big kernel buffers on `sock` and notes it for [`Self::kernel_drops`].
    fn tune(&self, sock: &UdpSocket) {
        use nix::sys::socket::{setsockopt, sockopt};
        if setsockopt(sock, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = setsockopt(sock, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
        if setsockopt(sock, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
            let _ = setsockopt(sock, sockopt::SndBuf, &SOCKET_BUFFER);
        }
        if let (Ok(st), Ok(mut v)) = (nix::sys::stat::fstat(sock), self.sockets.lock()) {
            v.push(st.st_ino);
        }
    }

    /// Datagrams the kernel dropped so far on the sockets [`Self::tune`] saw.
    fn kernel_drops(&self) -> u64 {
        let Ok(inodes) = self.sockets.lock().map(|v| v.clone()) else {
            return 0;
        };
        ["/proc/self/net/udp", "/proc/self/net/udp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .map(|t| udp_drops(&t, &inodes))
            .sum()
    }

    /// Replaces the impairment and starts the counters afresh.
    fn set_impair(&self, impair: Impair) {
        if let Ok(mut q) = self.queue.lock() {
            eprintln!("ztna-test-impair: now {impair:?}");
            q.impair = impair;
            q.link_free = [None; 2];
            self.counters.reset();
            self.drops_base
                .store(self.kernel_drops(), Ordering::Relaxed);
            self.applied.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The drops of the sockets with these inodes in a `/proc/net/udp` table (columns `sl
/// local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ref
/// pointer drops`).
fn udp_drops(table: &str, inodes: &[u64]) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode: u64 = f.get(9)?.parse().ok()?;
            let drops: u64 = f.get(12)?.parse().ok()?;
            inodes.contains(&inode).then_some(drops)
        })
        .sum()
}

fn run() -> Result<(), String> {
    let opts = parse()?;
    let mut listens = Vec::new();
    for (listen, target) in &opts.pairs {
        let s = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        eprintln!("ztna-test-impair: {listen} -> {target}");
        listens.push((Arc::new(s), *target));
    }
    let seed = opts.seed;
    let exit_after = opts.exit_after;
    eprintln!("ztna-test-impair: {:?}", opts.impair);
    let shared = Arc::new(Shared {
        queue: Mutex::new(State {
            impair: opts.impair.clone(),
            heap: BinaryHeap::new(),
            rng: Rng(seed),
            seq: 0,
            last_due: HashMap::new(),
            link_free: [None; 2],
        }),
        opts,
        ready: Condvar::new(),
        stop: AtomicBool::new(false),
        applied: AtomicU64::new(0),
        counters: Counters::default(),
        sockets: Mutex::new(Vec::new()),
        drops_base: AtomicU64::new(0),
    });
    for (listen, _) in &listens {
        shared.tune(listen);
    }

    let sender = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || send_loop(&shared))
    };
    let receivers: Vec<_> = listens
        .into_iter()
        .map(|(listen, target)| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || client_loop(&shared, &listen, target))
        })
        .collect();

    let start = Instant::now();
    let mut last_report = start;
    let mut control_mtime = None;
    let mut written = 0u64;
    while start.elapsed() < exit_after {
        std::thread::sleep(Duration::from_millis(100).min(exit_after - start.elapsed()));
        if let Some(path) = &shared.opts.control_file {
            let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if mtime.is_some() && mtime != control_mtime {
                control_mtime = mtime;
                match read_control(path) {
                    Ok(impair) => shared.set_impair(impair),
                    Err(e) => eprintln!("ztna-test-impair: control file: {e}"),
                }
            }
        }
        let drops = shared
            .kernel_drops()
            .saturating_sub(shared.drops_base.load(Ordering::Relaxed));
        shared.counters.socket_drops.store(drops, Ordering::Relaxed);
        if let Some(path) = &shared.opts.stats_file {
            let tmp = path.with_extension("tmp");
            written += 1;
            let text = format!(
                "{}\napplied={}\nwritten={written}\n",
                shared.counters.render("\n"),
                shared.applied.load(Ordering::Relaxed)
            );
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            report(&shared.counters, "after", start.elapsed());
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    shared.ready.notify_all();
    for r in receivers {
        let _ = r.join();
    }
    let _ = sender.join();
    report(&shared.counters, "exiting after", exit_after);
    Ok(())
}

fn report(c: &Counters, what: &str, t: Duration) {
    eprintln!(
        "ztna-test-impair: {what} {} s: {}",
        t.as_secs(),
        c.render(" ")
    );
}

/// Receives from clients on one listening socket and queues their datagrams towards its
/// target, through one upstream socket per client (whose answers a thread of its own queues
/// back).
fn client_loop(shared: &Arc<Shared>, listen: &Arc<UdpSocket>, target: SocketAddr) {
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
                let bind: SocketAddr = if target.is_ipv4() {
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
                shared.tune(&s);
                let s = Arc::new(s);
                eprintln!("ztna-test-impair: new client {from}");
                upstream.insert(from, Arc::clone(&s));
                let shared = Arc::clone(shared);
                let listen = Arc::clone(listen);
                let up = Arc::clone(&s);
                std::thread::spawn(move || upstream_loop(&shared, &up, &listen, from, target));
                s
            }
        };
        shared.submit(&up, target, true, &buf[..n]);
    }
}

/// Queues the target's answers on one client's upstream socket back to that client.
fn upstream_loop(
    shared: &Shared,
    up: &UdpSocket,
    listen: &Arc<UdpSocket>,
    client: SocketAddr,
    target: SocketAddr,
) {
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        match up.recv_from(&mut buf) {
            Ok((n, from)) if from == target => shared.submit(listen, client, false, &buf[..n]),
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
        let c = &shared.counters;
        match h.via.send_to(&h.data, h.to) {
            Ok(n) => {
                c.forwarded.fetch_add(1, Ordering::Relaxed);
                let bytes = if h.up {
                    &c.up_out_bytes
                } else {
                    &c.down_out_bytes
                };
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => {
                c.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        q = match shared.queue.lock() {
            Ok(g) => g,
            Err(_) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_drops_are_read_from_the_udp_table_by_inode() {
        let table = "\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  120: 00000000:8A38 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 8267
  121: 0100007F:3841 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 101
  122: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2 0000000000000000 7
";
        assert_eq!(udp_drops(table, &[4242, 4243]), 8368);
        assert_eq!(udp_drops(table, &[4242]), 8267);
        assert_eq!(udp_drops(table, &[]), 0);
        assert_eq!(udp_drops("garbage\nmore garbage", &[4242]), 0);
    }
}
