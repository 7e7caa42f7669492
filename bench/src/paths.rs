//! The paths under test, one [`PathSpec`] each, all on the same namespace topology of
//! `deploy/netns/topo.sh`:
//!
//! ```text
//! agent 10.10.0.2 ── br0 (wan) ── conn 10.10.0.3 / 10.10.3.1 ── backend 10.10.3.2 (iperf3 -s)
//!                     └── relay 10.10.0.1
//! ```
//!
//! Every path carries traffic from the agent namespace to the iperf3 server and the UDP echo
//! server in the backend namespace, through the connector namespace:
//!
//! - `raw`: plain IP routing, agent → conn (kernel forwarding) → backend. The limit.
//! - `wg-kernel`, `boringtun`, `wireguard-go`: a WireGuard tunnel between the agent and the
//!   connector namespaces (agent → conn over the bridge, UDP 51820), then routed by the kernel
//!   to the backend. Tunnel MTU 1280, as ztna's.
//! - `ztna-relay`: agent → relay → connector over QUIC, then the connector's own sockets to
//!   the backend (the inner connection is end to end agent ↔ connector).
//! - `ztna-direct`: the same inner connection on the direct path agent → connector (the two
//!   share the bridge, so it is the direct LAN path), the relay only brokering it.
//! - `ztna-direct-xdp`: `ztna-direct` with the connector's XDP fast path (`xdp = "native"`),
//!   which carries backend UDP replies (the `-R` UDP tests) without per-flow sockets.
//!
//! To add a path, write its setup function and add one entry to [`PATHS`].

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ztna_e2e::{addr, wait_until, Node, Stack, Topology};

use crate::measure::Daemon;

/// One path under test.
pub(crate) struct PathSpec {
    /// Short name, used in results and the chart.
    pub(crate) name: &'static str,
    /// The hops it crosses, for the report.
    pub(crate) hops: &'static str,
    /// `Some(reason)` when it can't run on this machine (it is then skipped and reported so).
    pub(crate) unavailable: fn() -> Option<String>,
    /// Brings the path up in a fresh topology whose backend already runs the iperf3 server.
    pub(crate) setup: fn(&Topology) -> Result<PathUp>,
}

/// A path that is up.
pub(crate) struct PathUp {
    /// The address the agent namespace sends the tests to.
    pub(crate) target: &'static str,
    /// The tunnel daemons whose CPU and memory are measured.
    pub(crate) daemons: Vec<Daemon>,
    /// From starting the agent side to the first UDP datagram echoed through the path.
    pub(crate) first_packet: Option<Duration>,
    /// ztna: the agent's status socket.
    pub(crate) status_socket: Option<std::path::PathBuf>,
    /// Held while the path is measured: the pass-through XDP program on the relay's bridge port
    /// (`ztna-relay-xdp`).
    pub(crate) keep: Option<ztna_relay::xdp::Attachment>,
}

/// The paths, in the order they run within each iteration. The path named `boringtun` is the
/// reference of the ratios.
pub(crate) const PATHS: &[PathSpec] = &[
    PathSpec {
        name: "raw",
        hops: "agent → conn (kernel IP forwarding) → backend; no tunnel",
        unavailable: always_available,
        setup: raw,
    },
    PathSpec {
        name: "wg-kernel",
        hops: "agent → conn in kernel WireGuard (UDP 51820), routed → backend",
        unavailable: kernel_wireguard_missing,
        setup: wg_kernel,
    },
    PathSpec {
        name: "boringtun",
        hops: "agent → conn in boringtun-cli (TUN, UDP 51820), routed → backend",
        unavailable: boringtun_missing,
        setup: boringtun,
    },
    PathSpec {
        name: "wireguard-go",
        hops: "agent → conn in wireguard-go (TUN, UDP 51820), routed → backend",
        unavailable: wireguard_go_missing,
        setup: wireguard_go,
    },
    PathSpec {
        name: "ztna-relay",
        hops:
            "agent (TUN) → relay → connector over QUIC (inner QUIC end to end), connector → backend",
        unavailable: always_available,
        setup: ztna_relay,
    },
    PathSpec {
        name: "ztna-relay-xdp",
        hops: "as ztna-relay, with the relay forwarding channel data in its XDP program (native \
               on the relay's veth)",
        unavailable: always_available,
        setup: ztna_relay_xdp,
    },
    PathSpec {
        name: "ztna-direct",
        hops: "agent (TUN) → connector over QUIC on the direct LAN path (hole punched, the relay \
               only brokers it), connector → backend",
        unavailable: always_available,
        setup: ztna_direct,
    },
    PathSpec {
        name: "ztna-direct-xdp",
        hops: "as ztna-direct, with the connector's XDP fast path (native on the backend veth) \
               carrying backend UDP replies",
        unavailable: always_available,
        setup: ztna_direct_xdp,
    },
];

/// The name of the reference path of the ratios.
pub(crate) const REFERENCE: &str = "boringtun";

/// The WireGuard tunnel's subnet: the connector side is .1, the agent side .2.
const WG_NET: &str = "10.200.0.0/24";
const WG_CONN: &str = "10.200.0.1";
const WG_AGENT: &str = "10.200.0.2";
const WG_PORT: u16 = 51820;
/// Tunnel MTU of every tunnel, ztna's default.
const TUNNEL_MTU: &str = "1280";
/// The backend's subnet, routed from the agent namespace into the path.
const BACKEND_NET: &str = "10.10.3.0/24";
/// How long the first echoed datagram may take.
const FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(30);

fn always_available() -> Option<String> {
    None
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

fn missing(program: &str, how: &str) -> Option<String> {
    (!on_path(program)).then(|| format!("{program} not found on PATH ({how})"))
}

fn boringtun_missing() -> Option<String> {
    missing("boringtun-cli", "scripts/setup.sh installs it")
        .or_else(|| missing("wg", "apt-get install wireguard-tools"))
}

fn wireguard_go_missing() -> Option<String> {
    missing("wireguard-go", "apt-get install wireguard-go")
        .or_else(|| missing("wg", "apt-get install wireguard-tools"))
}

/// Whether this kernel can create a WireGuard interface, tried in a throwaway namespace.
fn kernel_wireguard_missing() -> Option<String> {
    if let Some(m) = missing("wg", "apt-get install wireguard-tools") {
        return Some(m);
    }
    let ns = format!("ztwgprobe{}", std::process::id());
    let run = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !run(&["netns", "add", &ns]) {
        return Some("could not create a probe namespace".into());
    }
    let ok = run(&["-n", &ns, "link", "add", "wgprobe", "type", "wireguard"]);
    run(&["netns", "del", &ns]);
    (!ok).then(|| "no kernel WireGuard (`ip link add type wireguard` fails)".into())
}

/// Runs `ip ARGS...` in `node`'s namespace, failing on a non-zero exit.
fn ip(t: &Topology, node: Node, args: &[&str]) -> Result<()> {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    t.run_ok(node, 10, full)?;
    Ok(())
}

/// Lets the connector namespace forward between the WAN and the backend, and routes `from`
/// back from the backend through it.
fn forward_through_conn(t: &Topology, from: &str) -> Result<()> {
    t.run_ok(
        Node::Conn,
        10,
        ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
    )?;
    ip(
        t,
        Node::Backend,
        &["route", "replace", from, "via", addr::CONN_BACK],
    )
}

/// A UDP echo server on the backend's port 7, for the first-packet time.
fn start_udp_echo(t: &Topology) -> Result<()> {
    let id = t.spawn(
        Node::Backend,
        "udp-echo",
        &t.helpers().udp_echo,
        [
            format!("{}:7", addr::BACKEND),
            "--exit-after".into(),
            "3600".into(),
        ],
    )?;
    std::thread::sleep(Duration::from_millis(200));
    t.ensure_running(id)
}

/// Sends one datagram at a time to the echo server `target` from the agent namespace until one
/// comes back, and returns how long after `since` that was. `alive` says whether the agent side
/// still runs; the wait stops early when it doesn't.
fn first_echo(
    t: &Topology,
    target: &str,
    since: Instant,
    alive: impl Fn() -> bool,
) -> Result<Duration> {
    let check = t.helpers().udp_check.clone();
    let args = [
        check.as_os_str(),
        target.as_ref(),
        "--count".as_ref(),
        "1".as_ref(),
        "--timeout-ms".as_ref(),
        "100".as_ref(),
        "--retries".as_ref(),
        "0".as_ref(),
        "--quiet".as_ref(),
    ];
    let mut answered = None;
    wait_until_every_ms(
        &format!("a first datagram echoed by {target}"),
        FIRST_PACKET_TIMEOUT,
        || {
            if !alive() {
                return true;
            }
            if t.run(Node::Agent, 5, args).is_ok_and(|o| o.success()) {
                answered = Some(since.elapsed());
                return true;
            }
            false
        },
    )?;
    answered.context("the agent side exited before a datagram was echoed")
}

/// `ztna_e2e::wait_until` polling every 20 ms.
fn wait_until_every_ms(what: &str, timeout: Duration, cond: impl FnMut() -> bool) -> Result<()> {
    ztna_e2e::wait::wait_until_every(what, timeout, Duration::from_millis(20), cond)?;
    Ok(())
}

fn raw(t: &Topology) -> Result<PathUp> {
    forward_through_conn(t, "10.10.0.0/24")?;
    ip(
        t,
        Node::Agent,
        &["route", "replace", BACKEND_NET, "via", addr::CONN],
    )?;
    start_udp_echo(t)?;
    Ok(PathUp {
        target: addr::BACKEND,
        daemons: vec![],
        first_packet: None,
        status_socket: None,
        keep: None,
    })
}

/// Which WireGuard implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wg {
    Kernel,
    Boringtun,
    Go,
}

fn wg_kernel(t: &Topology) -> Result<PathUp> {
    wireguard(t, Wg::Kernel)
}

fn boringtun(t: &Topology) -> Result<PathUp> {
    wireguard(t, Wg::Boringtun)
}

fn wireguard_go(t: &Topology) -> Result<PathUp> {
    wireguard(t, Wg::Go)
}

/// The UAPI socket of a userspace WireGuard interface. It lives in the file system, not in the
/// namespace, so interface names carry the topology's prefix.
pub(crate) fn wg_socket(ifname: &str) -> String {
    format!("/var/run/wireguard/{ifname}.sock")
}

/// The interface names of the agent and connector sides in topology `prefix`.
pub(crate) fn wg_ifnames(prefix: &str) -> [String; 2] {
    [format!("{prefix}a"), format!("{prefix}c")]
}

/// A fresh WireGuard key pair (private, public), base64, from `wg`.
fn wg_keys(t: &Topology) -> Result<(String, String)> {
    let out = t.host(
        10,
        [
            "bash",
            "-c",
            "k=$(wg genkey) && echo \"$k\" && echo \"$k\" | wg pubkey",
        ],
    )?;
    if !out.success() {
        bail!("{out}");
    }
    let mut lines = out.stdout.lines();
    match (lines.next(), lines.next()) {
        (Some(private), Some(public)) => Ok((private.to_owned(), public.to_owned())),
        _ => bail!("wg genkey/pubkey printed {:?}", out.stdout),
    }
}

/// Creates interface `ifname` in `node`: the kernel's, or a userspace daemon's TUN device
/// (then waits for its UAPI socket and returns the daemon).
fn wg_interface(t: &Topology, node: Node, ifname: &str, wg: Wg) -> Result<Option<Daemon>> {
    let side = node.name();
    let id = match wg {
        Wg::Kernel => {
            ip(t, node, &["link", "add", ifname, "type", "wireguard"])?;
            return Ok(None);
        }
        Wg::Boringtun => {
            let log = t.dir().join(format!("boringtun-{side}.out"));
            t.spawn(
                node,
                &format!("boringtun-{side}"),
                "boringtun-cli",
                [
                    ifname.as_ref(),
                    "--foreground".as_ref(),
                    "--disable-drop-privileges".as_ref(),
                    "--log".as_ref(),
                    log.as_os_str(),
                ],
            )?
        }
        Wg::Go => t.spawn(
            node,
            &format!("wireguard-go-{side}"),
            "wireguard-go",
            ["-f", ifname],
        )?,
    };
    let sock = wg_socket(ifname);
    wait_until(
        &format!("the UAPI socket {sock}"),
        Duration::from_secs(10),
        || !t.is_running(id) || Path::new(&sock).exists(),
    )?;
    t.ensure_running(id)?;
    let name = match wg {
        Wg::Boringtun => "boringtun",
        _ => "wireguard-go",
    };
    Ok(Some(Daemon {
        name: format!("{name} ({side})"),
        pid: t.pid(id)?,
    }))
}

/// `wg set IFNAME private-key KEY ARGS...` in `node`.
fn wg_set(t: &Topology, node: Node, ifname: &str, key: &Path, args: &[&str]) -> Result<()> {
    let key = key.to_string_lossy();
    let mut full = vec!["wg", "set", ifname, "private-key", &key];
    full.extend_from_slice(args);
    t.run_ok(node, 10, full)?;
    Ok(())
}

/// Addresses `ifname` with `addr/24`, sets the tunnel MTU and brings it up.
fn wg_up(t: &Topology, node: Node, ifname: &str, addr: &str) -> Result<()> {
    ip(
        t,
        node,
        &["addr", "add", &format!("{addr}/24"), "dev", ifname],
    )?;
    ip(t, node, &["link", "set", ifname, "mtu", TUNNEL_MTU, "up"])
}

fn wireguard(t: &Topology, wg: Wg) -> Result<PathUp> {
    wireguard_via(t, wg, &format!("{}:{WG_PORT}", addr::CONN), true)
}

/// The agent's WireGuard peer endpoint when a path is impaired: the impairment forwarder in
/// the agent namespace.
pub(crate) const IMPAIR_LISTEN: &str = "127.0.0.1:14433";

/// The second tunnel's forwarder address when two tunnels share the forwarder ([`compete`]).
pub(crate) const IMPAIR_LISTEN_2: &str = "127.0.0.1:14435";

/// Where the impairment forwarder of `tunnel` sends what the agent sends it: the tunnel's
/// first UDP hop.
pub(crate) fn impair_target(tunnel: &str) -> String {
    match tunnel {
        "ztna-relay" | "ztna-relay-256k" => format!("{}:{}", addr::RELAY, addr::RELAY_PORT),
        "ztna-direct" => format!("{}:{CONN_QUIC_PORT}", addr::CONN),
        _ => format!("{}:{WG_PORT}", addr::CONN),
    }
}

/// The connector's QUIC port (its direct-path host candidate) in the e2e configs.
const CONN_QUIC_PORT: u16 = 4434;

/// The agent socket's fwmark (`route_table`'s default), which tells its datagrams apart from
/// the forwarder's.
const AGENT_FWMARK: &str = "0x7a7a";

/// Puts the direct path through the impairment forwarder, both ways, with nftables in the agent
/// namespace: the agent's datagrams to the connector's QUIC port (they carry the agent socket's
/// fwmark; the forwarder's own carry none) are DNATed to the forwarder; its other datagrams to
/// the connector are dropped, and so are the connector's datagrams that reach the agent's socket
/// from outside (not through the forwarder, whose answers come over loopback). The agent still
/// sees the connector's address, so its direct path is the LAN path, impaired; the connector
/// sees the agent at the forwarder's address. The relay path stays unimpaired. The namespace
/// (and the rules) go with the topology.
fn impair_direct_path(t: &Topology) -> Result<()> {
    let (ip, port) = IMPAIR_LISTEN
        .split_once(':')
        .context("IMPAIR_LISTEN is address:port")?;
    let rules = format!(
        "table ip ztna_bench_impair {{\n\
         chain out {{\n\
         type nat hook output priority -100; policy accept;\n\
         meta mark {AGENT_FWMARK} ip daddr {conn} udp dport {CONN_QUIC_PORT} dnat to {ip}:{port}\n\
         }}\n\
         chain out_filter {{\n\
         type filter hook output priority 0; policy accept;\n\
         meta mark {AGENT_FWMARK} ip daddr {conn} udp dport != {CONN_QUIC_PORT} drop\n\
         }}\n\
         chain in {{\n\
         type filter hook prerouting priority -150; policy accept;\n\
         iifname != \"lo\" ip saddr {conn} socket mark {AGENT_FWMARK} drop\n\
         }}\n\
         }}\n",
        conn = addr::CONN,
    );
    let file = t.write_file("impair-direct.nft", &rules)?;
    t.run_ok(
        Node::Agent,
        10,
        ["nft".as_ref(), "-f".as_ref(), file.as_os_str()],
    )
    .context("installing the direct-path DNAT")?;
    Ok(())
}

/// A tunnel whose agent side sends its UDP through the impairment forwarder at
/// [`IMPAIR_LISTEN`]: `boringtun`, `wireguard-go`, `ztna-relay` (`-256k`) or `ztna-direct`.
pub(crate) fn impaired(t: &Topology, tunnel: &str) -> Result<PathUp> {
    match tunnel {
        "boringtun" => wireguard_via(t, Wg::Boringtun, IMPAIR_LISTEN, true),
        "wireguard-go" => wireguard_via(t, Wg::Go, IMPAIR_LISTEN, true),
        "ztna-relay" => ztna(t, "relay", |s| s.agent_cfg.relay = IMPAIR_LISTEN.to_owned()),
        // The connector's TCP buffers at 256 KiB each way (its default before 4 MiB), which
        // bound a TCP connection to 256 KiB per RTT.
        "ztna-relay-256k" => ztna(t, "relay", |s| {
            s.agent_cfg.relay = IMPAIR_LISTEN.to_owned();
            s.conn_cfg.tcp_buffer_bytes = Some(256 << 10);
        }),
        "ztna-direct" => {
            impair_direct_path(t)?;
            ztna(t, "direct-lan", |s| s.agent_cfg.direct_paths = None)
        }
        _ => bail!("no impaired variant of {tunnel}"),
    }
}

/// ztna on the relay path through the impairment forwarder at [`IMPAIR_LISTEN`] and boringtun
/// through [`IMPAIR_LISTEN_2`] (the same forwarder, so the same bottleneck), both up at once in
/// one topology: (ztna, boringtun).
pub(crate) fn compete(t: &Topology) -> Result<(PathUp, PathUp)> {
    let ztna = impaired(t, "ztna-relay")?;
    // ztna's backends already echo on the backend's port 7.
    let boringtun = wireguard_via(t, Wg::Boringtun, IMPAIR_LISTEN_2, false)?;
    Ok((ztna, boringtun))
}

/// A WireGuard tunnel whose agent side sends to `endpoint`; `echo`: start the backend's UDP
/// echo server (the first-packet time needs one).
fn wireguard_via(t: &Topology, wg: Wg, endpoint: &str, echo: bool) -> Result<PathUp> {
    forward_through_conn(t, WG_NET)?;
    if echo {
        start_udp_echo(t)?;
    }
    let (conn_key, conn_pub) = wg_keys(t)?;
    let (agent_key, agent_pub) = wg_keys(t)?;
    let conn_key = t.write_file("wg-conn.key", &conn_key)?;
    let agent_key = t.write_file("wg-agent.key", &agent_key)?;
    let [agent_if, conn_if] = wg_ifnames(t.prefix());
    let port = WG_PORT.to_string();
    let mut daemons = Vec::new();

    daemons.extend(wg_interface(t, Node::Conn, &conn_if, wg)?);
    wg_set(
        t,
        Node::Conn,
        &conn_if,
        &conn_key,
        &[
            "listen-port",
            &port,
            "peer",
            &agent_pub,
            "allowed-ips",
            &format!("{WG_AGENT}/32"),
        ],
    )?;
    wg_up(t, Node::Conn, &conn_if, WG_CONN)?;

    let start = Instant::now();
    daemons.extend(wg_interface(t, Node::Agent, &agent_if, wg)?);
    wg_set(
        t,
        Node::Agent,
        &agent_if,
        &agent_key,
        &[
            "peer",
            &conn_pub,
            "allowed-ips",
            &format!("{WG_CONN}/32,{BACKEND_NET}"),
            "endpoint",
            endpoint,
        ],
    )?;
    wg_up(t, Node::Agent, &agent_if, WG_AGENT)?;
    ip(
        t,
        Node::Agent,
        &["route", "replace", BACKEND_NET, "dev", &agent_if],
    )?;
    let pids: Vec<u32> = daemons.iter().map(|d| d.pid).collect();
    let alive = || {
        pids.iter()
            .all(|p| Path::new(&format!("/proc/{p}")).exists())
    };
    let first = first_echo(t, &format!("{}:7", addr::BACKEND), start, alive)?;
    Ok(PathUp {
        target: addr::BACKEND,
        daemons,
        first_packet: Some(first),
        status_socket: None,
        keep: None,
    })
}

fn ztna_relay(t: &Topology) -> Result<PathUp> {
    // The e2e harness keeps the agent on the relay path (`direct_paths = false`).
    ztna(t, "relay", |_| {})
}

fn ztna_relay_xdp(t: &Topology) -> Result<PathUp> {
    // Native XDP_TX on the relay's veth reaches the bridge only when the bridge's port has an
    // XDP program of its own: one that passes everything.
    let peer = ztna_e2e::relay_xdp_peer(t)?;
    let mut up = ztna(t, "relay", |s| s.relay_cfg.xdp = Some("native".into()))?;
    up.keep = Some(peer);
    Ok(up)
}

fn ztna_direct(t: &Topology) -> Result<PathUp> {
    // The connector's default data plane: per-flow UDP sockets (`xdp = "off"`).
    ztna(t, "direct-lan", |s| s.agent_cfg.direct_paths = None)
}

fn ztna_direct_xdp(t: &Topology) -> Result<PathUp> {
    ztna(t, "direct-lan", |s| {
        s.agent_cfg.direct_paths = None;
        s.conn_cfg.xdp = "native".into();
    })
}

/// ztna with the demo configs plus the iperf3 ports (TCP and UDP 5201, TCP 5202) on service `web`
/// (10.100.0.4 → the backend), after `tweak` changed the configs: relay, connector, then the
/// agent, timed from its start to the first datagram echoed by service `echo`. Then waits until
/// `ztna-agent status` shows `conn1` on `path` (`relay` or `direct-lan`), so the
/// tests measure that path.
fn ztna(t: &Topology, path: &str, tweak: impl FnOnce(&mut Stack<'_>)) -> Result<PathUp> {
    let mut s = Stack::new(t)?;
    s.enable_web();
    let port = crate::measure::IPERF_PORT.to_string();
    let web = s
        .conn_cfg
        .services
        .iter_mut()
        .find(|svc| svc.name == "web")
        .context("the demo connector config has no service `web`")?;
    web.tcp.push(port.clone());
    web.udp.push(port);
    // A second iperf3 server, for two flows at once.
    web.tcp.push(crate::measure::IPERF_PORT_2.to_string());
    tweak(&mut s);
    s.start_backends()?;
    let relay = s.start_relay()?;
    let connector = s.start_connector()?;
    let start = Instant::now();
    let agent = s.start_agent()?;
    let first = first_echo(t, &format!("{}:7", addr::ECHO), start, || {
        t.is_running(agent)
    })?;
    let socket = s.agent_cfg.status_socket.clone();
    let last = std::cell::RefCell::new(String::new());
    wait_until(
        &format!("conn1 on the {path} path"),
        ztna_e2e::stack::READY_TIMEOUT,
        || match s.status(&socket) {
            Ok(st) => {
                *last.borrow_mut() = st.json.to_string();
                st.connector_path("conn1") == Some(path)
            }
            Err(e) => {
                *last.borrow_mut() = format!("{e:#}");
                false
            }
        },
    )
    .with_context(|| format!("last status: {}", last.borrow()))?;
    t.ensure_running(agent)?;
    Ok(PathUp {
        target: addr::WEB,
        daemons: vec![
            Daemon {
                name: "ztna-agent".into(),
                pid: t.pid(agent)?,
            },
            Daemon {
                name: "ztna-relay".into(),
                pid: t.pid(relay)?,
            },
            Daemon {
                name: "ztna-connector".into(),
                pid: t.pid(connector)?,
            },
        ],
        first_packet: Some(first),
        status_socket: Some(socket),
        keep: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_names_are_unique_and_the_reference_exists() {
        let mut names: Vec<_> = PATHS.iter().map(|p| p.name).collect();
        assert!(names.contains(&REFERENCE));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PATHS.len());
    }

    #[test]
    fn wg_interface_names_fit_ifnamsiz() {
        let [a, c] = wg_ifnames("zt1a2b3c");
        assert!(a.len() < 16 && c.len() < 16 && a != c);
    }
}
