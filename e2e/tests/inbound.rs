//! Issue #10: the agent accepts from a connector only packets whose source is one of that
//! connector's services and whose destination is the agent's tunnel IP. A modified connector
//! (`ztna-test-spoofing-connector`, registered as `conn1` with its certificate) sends packets
//! claiming another connector's service address and packets to the agent's LAN address, next to
//! genuine ones, as datagrams and on the TCP carriage stream; only the genuine ones may reach
//! the agent's TUN device.

use std::time::Duration;

use anyhow::{ensure, Context};
use ztna_e2e::pcap::count_occurrences;
use ztna_e2e::wait::{wait_until, wait_until_every};
use ztna_e2e::{addr, helper_bins, run, Node, Signal, Stack};

#[test]
fn spoofed_packets_from_a_connector_are_dropped() {
    run(
        "spoofed_packets_from_a_connector_are_dropped",
        helper_bins!(),
        |t| {
            let mut s = Stack::new(t)?;
            s.start_relay()?;
            let conn1 = s.pki.dir().join("conn1");
            let relay = format!("{}:{}", addr::RELAY, addr::RELAY_PORT);
            let fake = t.spawn(
                Node::Conn,
                "spoofing-connector",
                env!("CARGO_BIN_EXE_ztna-test-spoofing-connector"),
                [
                    relay,
                    s.pki.ca().to_str().context("path")?.to_owned(),
                    format!("{}.pem", conn1.display()),
                    format!("{}.key", conn1.display()),
                    addr::ECHO.to_owned(),
                    addr::SECRET.to_owned(),
                    addr::AGENT.to_owned(),
                    "--secs".to_owned(),
                    "30".to_owned(),
                ],
            )?;
            wait_until(
                "the fake connector to register",
                Duration::from_secs(10),
                || !t.is_running(fake) || t.log(fake).contains("registered"),
            )?;
            t.ensure_running(fake)?;
            s.start_agent()?;
            wait_until_every(
                "the agent's tunnel to the fake conn1",
                Duration::from_secs(20),
                Duration::from_millis(100),
                || {
                    s.status(&s.agent_cfg.status_socket)
                        .is_ok_and(|st| st.connector_path("conn1") == Some("relay"))
                },
            )?;
            let pcap = t.dir().join("tun.pcap");
            let cap = t.spawn(
                Node::Agent,
                "tcpdump-tun",
                "tcpdump",
                [
                    "-U",
                    "-n",
                    "-i",
                    "ztna0",
                    "-w",
                    pcap.to_str().context("path")?,
                    "udp",
                ],
            )?;
            wait_until("tcpdump to listen", Duration::from_secs(10), || {
                !t.is_running(cap) || t.log(cap).contains("listening on")
            })?;
            std::thread::sleep(Duration::from_secs(2));
            t.signal(cap, Signal::Int)?;
            t.wait_exit(cap, Duration::from_secs(10))?;
            let bytes = std::fs::read(&pcap)?;
            let [spoof, lan, good] =
                [&b"spoof"[..], b"lan", b"good"].map(|m| count_occurrences(&bytes, m));
            let [c_spoof, c_lan, c_good] =
                [&b"carrF"[..], b"carrL", b"carrG"].map(|m| count_occurrences(&bytes, m));
            let st = s.status(&s.agent_cfg.status_socket)?;
            let dropped = st.json["dropped_inbound"].as_u64().unwrap_or(0);
            t.step(&format!(
                "RESULT inbound check: on the agent's TUN {spoof} packets with another connector's source and {lan} to the agent's LAN address (both must be 0), {good} genuine; the agent counted {dropped} inbound drops"
            ));
            ensure!(good > 0, "no genuine packet reached the TUN: {}", st.json);
            ensure!(
                spoof == 0 && lan == 0,
                "spoofed packets reached the TUN: {spoof} with a foreign source, {lan} to the LAN address"
            );
            ensure!(dropped > 0, "no inbound drops counted: {}", st.json);
            t.step(&format!(
                "RESULT inbound check on the TCP carriage stream: {c_spoof} with a foreign source and {c_lan} to the LAN address (both must be 0), {c_good} genuine"
            ));
            ensure!(
                c_good > 0,
                "no genuine packet from the carriage stream reached the TUN: {}",
                st.json
            );
            ensure!(
                c_spoof == 0 && c_lan == 0,
                "spoofed packets from the carriage stream reached the TUN: {c_spoof} with a foreign source, {c_lan} to the LAN address"
            );
            Ok(())
        },
    );
}
