//! End-to-end test harness for ztna: builds a topology of network namespaces with
//! `deploy/netns/topo.sh`, mints a PKI with `ztna-relay pki`, writes configs, runs the real
//! `ztna-relay`, `ztna-connector` and `ztna-agent` binaries and real clients (ping, dig, tcpdump,
//! the `ztna-test-udp-*` helpers) inside the namespaces, and tears everything down again, also
//! when a test fails. It does I/O on processes, files and (through the programs it runs) the
//! network namespaces it created; nothing else.
//!
//! The tests need root (network namespaces, TUN). The binaries under test are found in
//! `$ZTNA_BIN_DIR` or else `<workspace>/target/release/`: run `cargo build --release --bins`
//! first. `ZTNA_E2E_LOG` sets the log filter of the daemons (default `info`), and
//! `ZTNA_E2E_KEEP=1` keeps each test's directory (configs, PKI, logs, captures) even on success.
//!
//! A test looks like this:
//!
//! ```ignore
//! use ztna_e2e::{helper_bins, run, Node, Stack};
//! run("example", helper_bins!(), |t| {
//!     let mut s = Stack::new(t)?;
//!     s.start_all()?;
//!     t.run_ok(Node::Agent, 10, ["ping", "-c", "1", "10.100.0.1"])?;
//!     Ok(())
//! });
//! ```

pub mod config;
pub mod metrics;
pub mod nat;
pub mod nginx;
pub mod pcap;
pub mod pki;
pub mod postgres;
pub mod proc_stats;
pub mod resolved;
pub mod stack;
pub mod status;
pub mod topology;
pub mod wait;

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

pub use config::{
    Access, AgentConfig, ConnectorConfig, ConnectorGrant, PolicyService, RelayConfig, ServiceConfig,
};
pub use metrics::Metrics;
pub use pki::{CertPaths, PkiDir, Role};
pub use proc_stats::{cpu_seconds, fd_count, peak_rss_kib, rss_kib};
pub use stack::Stack;
pub use status::AgentStatus;
pub use topology::{CmdOutput, DaemonId, Node, Signal, Topology};
pub use wait::wait_until;

/// Resolves `backend.ztna.test` from the agent through the tunnel's DNS service
/// (`dig @10.100.0.2`, `tries` tries of 2 s) and checks the answer is the backend's address.
pub fn dig_backend(t: &Topology, tries: u32) -> Result<()> {
    let server = format!("@{}", addr::DNS);
    let tries = format!("+tries={tries}");
    let out = t.run_ok(
        Node::Agent,
        20,
        [
            "dig",
            "+short",
            "+time=2",
            &tries,
            &server,
            "backend.ztna.test",
        ],
    )?;
    anyhow::ensure!(
        out.stdout.trim() == addr::BACKEND,
        "dig through the tunnel answered {:?}, not {}\n{out}",
        out.stdout.trim(),
        addr::BACKEND
    );
    Ok(())
}

/// Sends `count` UDP datagrams of 1..=`max_size` bytes (the first the largest) from the agent
/// to the echo service (`ztna-test-udp-check`) and checks every one came back byte for byte;
/// returns its summary line.
pub fn udp_echo_check(t: &Topology, count: u32, max_size: usize) -> Result<String> {
    udp_echo_check_to(t, &format!("{}:7", addr::ECHO), None, count, max_size)
}

/// [`udp_echo_check`] to the echo server at `target` (`IP:PORT`, `[IPv6]:PORT`), from a
/// socket bound to `bind` (default `0.0.0.0:0`; `[::]:0` for an IPv6 target).
pub fn udp_echo_check_to(
    t: &Topology,
    target: &str,
    bind: Option<&str>,
    count: u32,
    max_size: usize,
) -> Result<String> {
    let (count_s, max_s) = (count.to_string(), max_size.to_string());
    let mut args = vec![
        t.helpers().udp_check.as_os_str(),
        target.as_ref(),
        "--count".as_ref(),
        count_s.as_ref(),
        "--max-size".as_ref(),
        max_s.as_ref(),
    ];
    if let Some(b) = bind {
        args.extend([std::ffi::OsStr::new("--bind"), std::ffi::OsStr::new(b)]);
    }
    let out = t.run_ok(Node::Agent, 180, args)?;
    anyhow::ensure!(
        out.stdout.contains(&format!("ok={count} ")) && out.stdout.contains("mismatched=0"),
        "UDP echo check to {target} ({count} datagrams up to {max_size} bytes) failed:\n{out}"
    );
    Ok(out.stdout.trim().to_owned())
}

/// Fixed addresses of the topology (see `deploy/netns/README.md`).
pub mod addr {
    /// The relay on the WAN bridge.
    pub const RELAY: &str = "10.10.0.1";
    /// The agent on the WAN bridge.
    pub const AGENT: &str = "10.10.0.2";
    /// The connector on the WAN bridge.
    pub const CONN: &str = "10.10.0.3";
    /// The connector on its link to the backend.
    pub const CONN_BACK: &str = "10.10.3.1";
    /// The backend.
    pub const BACKEND: &str = "10.10.3.2";
    /// Service `echo`: UDP 7 and ICMP on the backend.
    pub const ECHO: &str = "10.100.0.1";
    /// Service `dns`: UDP 53 on the backend (dnsmasq).
    pub const DNS: &str = "10.100.0.2";
    /// Service `secret`: UDP 9 and ICMP on the backend; the test agent may not reach it.
    pub const SECRET: &str = "10.100.0.3";
    /// Service `web` (added by `Stack::enable_web`): TCP 80, 5432, 5001, 9000 on the backend.
    pub const WEB: &str = "10.100.0.4";
    /// The relay's QUIC port.
    pub const RELAY_PORT: u16 = 4433;
    /// Relay metrics (inside the relay namespace).
    pub const RELAY_METRICS: &str = "127.0.0.1:9433";
    /// Connector metrics (inside the connector namespace).
    pub const CONN_METRICS: &str = "127.0.0.1:9434";
}

/// Paths of the helper programs built from this package (`src/bin/`). Only integration tests
/// know them at compile time, so they pass them in with [`helper_bins!`].
#[derive(Debug, Clone)]
pub struct HelperBins {
    /// `ztna-test-udp-echo`.
    pub udp_echo: PathBuf,
    /// `ztna-test-udp-check`.
    pub udp_check: PathBuf,
    /// `ztna-test-impair`: UDP impairment forwarder (delay, jitter, reordering, loss).
    pub impair: PathBuf,
    /// `ztna-test-tcp`: TCP client and server modes (hold, half-close, connect, listen).
    pub tcp: PathBuf,
    /// `ztna-test-nat-probe`: STUN-like UDP probe for the NAT topology tests.
    pub nat_probe: PathBuf,
}

impl HelperBins {
    /// The helper programs as installed next to each other in `dir` (e.g. [`bin_dir`]), for
    /// programs outside this package's tests (the benchmarks).
    pub fn in_dir(dir: &std::path::Path) -> Self {
        Self {
            udp_echo: dir.join("ztna-test-udp-echo"),
            udp_check: dir.join("ztna-test-udp-check"),
            impair: dir.join("ztna-test-impair"),
            tcp: dir.join("ztna-test-tcp"),
            nat_probe: dir.join("ztna-test-nat-probe"),
        }
    }
}

/// The [`HelperBins`] of this package, for use in `tests/*.rs`.
#[macro_export]
macro_rules! helper_bins {
    () => {
        $crate::HelperBins {
            udp_echo: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztna-test-udp-echo")),
            udp_check: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztna-test-udp-check")),
            impair: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztna-test-impair")),
            tcp: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztna-test-tcp")),
            nat_probe: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztna-test-nat-probe")),
        }
    };
}

/// The workspace root (the directory holding `deploy/` and `target/`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Where the binaries under test are: `$ZTNA_BIN_DIR`, else `$CARGO_TARGET_DIR/release`, else
/// `<workspace>/target/release`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ZTNA_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("release");
    }
    workspace_root().join("target").join("release")
}

/// The path of one of the main binaries (`ztna-relay`, `ztna-connector`, `ztna-agent`), or a
/// clear error saying how to build it.
pub fn bin(name: &str) -> Result<PathBuf> {
    let dir = bin_dir();
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{name} not found at {}: run `cargo build --release --bins` first \
             (or set ZTNA_BIN_DIR to the directory holding ztna-relay, ztna-connector, ztna-agent)",
            path.display()
        );
    }
    Ok(path)
}

/// Moves the calling thread into network namespace `name` (`/var/run/netns/NAME`); threads it
/// starts from then on are there too. Call it on a thread of its own.
pub fn enter_netns(name: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{name}"))
        .with_context(|| format!("opening network namespace {name}"))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {name}"))
}

/// The relay's XDP program with forwarding off on the relay's bridge port (`relay` in the
/// WAN namespace), natively: a veth delivers frames its peer sends with native `XDP_TX` only
/// when it has an XDP program of its own. Detached when dropped.
pub fn relay_xdp_peer(t: &Topology) -> Result<ztna_relay::xdp::Attachment> {
    let wan = t.ns(Node::Wan);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            enter_netns(&wan)?;
            ztna_relay::xdp::attach_pass_through("relay", ztna_xdp_loader::Attached::Native)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))?
    })
    .context("a pass-through XDP program on the relay's bridge port")
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with a clear message unless this process runs as root.
pub fn require_root() -> Result<()> {
    if !is_root() {
        bail!(
            "the end-to-end tests need root (network namespaces, TUN devices): \
             run `sudo scripts/test.sh`, or `sudo -E cargo test --release -p ztna-e2e`; \
             to skip them explicitly set ZTNA_E2E_SKIP=1"
        );
    }
    Ok(())
}

/// Runs one end-to-end test: builds a [`Topology`] named after the test, runs `body` with it,
/// and turns an error into a panic while the topology is still alive, so the log tails of every
/// daemon are printed before it is torn down. Marks the topology passed when `body` succeeds.
///
/// With `ZTNA_E2E_SKIP=1` in the environment the test prints that it was skipped and returns.
#[track_caller]
pub fn run(test_name: &str, helpers: HelperBins, body: impl FnOnce(&Topology) -> Result<()>) {
    run_with(test_name, helpers, Topology::new, body)
}

/// [`run`] with the topology built by `build` (e.g. [`nat::up`]) instead of [`Topology::new`].
#[track_caller]
pub fn run_with(
    test_name: &str,
    helpers: HelperBins,
    build: impl FnOnce(&str, HelperBins) -> Result<Topology>,
    body: impl FnOnce(&Topology) -> Result<()>,
) {
    if std::env::var_os("ZTNA_E2E_SKIP").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test_name}: ZTNA_E2E_SKIP=1");
        return;
    }
    let topo = match build(test_name, helpers) {
        Ok(t) => t,
        Err(e) => panic!("{test_name}: could not set up: {e:#}"),
    };
    match body(&topo) {
        Ok(()) => topo.mark_passed(),
        Err(e) => panic!("{test_name} failed: {e:#}"),
    }
}

/// `n` random bytes from the kernel, as lowercase hex (for markers in payloads).
pub fn random_hex(n: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| anyhow::anyhow!("reading /dev/urandom: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether some line of `log` contains `needle` and one of `any` (all case-insensitive).
pub fn log_has_line(log: &str, needle: &str, any: &[&str]) -> bool {
    let needle = needle.to_lowercase();
    log.lines()
        .map(str::to_lowercase)
        .any(|l| l.contains(&needle) && any.iter().any(|a| l.contains(&a.to_lowercase())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_has_the_length_asked() {
        let a = random_hex(16).expect("urandom");
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(16).expect("urandom"));
    }

    #[test]
    fn log_lines_match_case_insensitively() {
        let log = "INFO started\nWARN relay refused service \"dns\": not allowed\n";
        assert!(log_has_line(log, "dns", &["refus", "denied"]));
        assert!(!log_has_line(log, "echo", &["refus"]));
    }
}
