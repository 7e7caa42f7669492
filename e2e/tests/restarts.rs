//! Issue #10, restarts that don't break users: a relay SIGKILL and restart in the middle of a
//! 200 MiB download resets no TCP connection, on the relay path and on the direct path. The
//! inner connection outlives the outer session: the agent's next session opens a new channel
//! to the same connector, and both ends re-point the live inner connection at it.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ztna_e2e::nginx::{sha256, web_root};
use ztna_e2e::wait::wait_until_every;
use ztna_e2e::{addr, helper_bins, run, Node, Stack, Topology};

const MIB: u64 = 1024 * 1024;
/// The download's size.
const SIZE: u64 = 200 * MIB;
/// curl's rate limit, so that the download is still running when the relay dies (about 13 s).
const RATE: &str = "16M";
/// How long the relay stays dead.
const DEAD_FOR: Duration = Duration::from_secs(2);

/// Downloads 200 MiB from nginx through the tunnel, SIGKILLs the relay once a few MiB have
/// arrived, restarts it [`DEAD_FOR`] later, and checks that curl finishes with the right bytes.
/// `ready` runs after the stack is up (e.g. to wait for the direct path).
fn download_across_relay_restart(
    t: &Topology,
    direct: bool,
    ready: impl Fn(&Stack<'_>) -> Result<()>,
) -> Result<()> {
    let mut s = Stack::new(t)?;
    s.enable_web();
    if direct {
        s.agent_cfg.direct_paths = None;
    }
    let (root, _) = web_root(t, Some(SIZE))?;
    let file = root.join("big.bin");
    let _nginx = ztna_e2e::nginx::start(t, Node::Backend, &format!("{}:80", addr::BACKEND), &root)?;
    s.start_all()?;
    ready(&s)?;

    let got = t.dir().join("downloaded.bin");
    let url = format!("http://{}/big.bin", addr::WEB);
    let curl = t.spawn(
        Node::Agent,
        "curl",
        "curl",
        [
            "-sS",
            "-f",
            "--limit-rate",
            RATE,
            "-m",
            "120",
            "-o",
            got.to_str().context("path")?,
            &url,
        ],
    )?;
    wait_until_every(
        "the first 16 MiB of the download",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || !t.is_running(curl) || std::fs::metadata(&got).is_ok_and(|m| m.len() >= 16 * MIB),
    )?;
    t.ensure_running(curl)?;
    let relay = s.relay.context("relay not started")?;
    let at = std::fs::metadata(&got).map(|m| m.len()).unwrap_or(0);
    t.step(&format!("SIGKILL the relay at {} MiB", at / MIB));
    t.kill(relay)?;
    std::thread::sleep(DEAD_FOR);
    let during = std::fs::metadata(&got).map(|m| m.len()).unwrap_or(0);
    t.step(&format!(
        "relay dead for {:?}: {} MiB arrived meanwhile; restarting it",
        DEAD_FOR,
        (during - at) / MIB
    ));
    let restarted = Instant::now();
    s.start_relay()?;
    let status = t.wait_exit(curl, Duration::from_secs(150))?;
    let log = t.log(curl);
    ensure!(
        status.success(),
        "curl failed across the relay restart ({status}):\n{log}"
    );
    let (want, have) = (sha256(t, &file)?, sha256(t, &got)?);
    let size = std::fs::metadata(&got).map(|m| m.len()).unwrap_or(0);
    let st = s.status(&s.agent_cfg.status_socket)?;
    t.step(&format!(
        "RESULT relay restart ({} path): 200 MiB download finished {:.1} s after the restart, sha256 {}, {} MiB moved while the relay was dead; agent relay sessions {}, conn1 path {:?}, inbound drops {}",
        if direct { "direct" } else { "relay" },
        restarted.elapsed().as_secs_f64(),
        if want == have { "matches" } else { "DIFFERS" },
        (during - at) / MIB,
        st.json["relay_sessions"],
        st.connector_path("conn1"),
        st.json["dropped_inbound"],
    ));
    ensure!(
        want == have && size == SIZE,
        "download corrupted: sha256 {want} sent, {have} received ({size} bytes)"
    );
    ensure!(
        st.json["relay_sessions"].as_u64() >= Some(2),
        "the agent never reconnected: {}",
        st.json
    );
    // The inbound source check let all of the genuine traffic through.
    ensure!(
        st.json["dropped_inbound"].as_u64() == Some(0),
        "the inbound check dropped genuine packets: {}",
        st.json
    );
    Ok(())
}

#[test]
fn relay_restart_keeps_tcp_on_the_relay_path() {
    run(
        "relay_restart_keeps_tcp_on_the_relay_path",
        helper_bins!(),
        |t| download_across_relay_restart(t, false, |_| Ok(())),
    );
}

#[test]
fn relay_restart_keeps_tcp_on_the_direct_path() {
    run(
        "relay_restart_keeps_tcp_on_the_direct_path",
        helper_bins!(),
        |t| {
            download_across_relay_restart(t, true, |s| {
                wait_until_every(
                    "a direct LAN path",
                    Duration::from_secs(15),
                    Duration::from_millis(100),
                    || {
                        s.status(&s.agent_cfg.status_socket)
                            .ok()
                            .and_then(|st| st.connector_path("conn1").map(str::to_owned))
                            .is_some_and(|p| p == "direct-lan")
                    },
                )?;
                Ok(())
            })
        },
    );
}
