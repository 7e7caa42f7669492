//! Issue #2: the tunnel carries ICMP, UDP and DNS over the relay path, and the relay sees only
//! ciphertext.

use std::time::Duration;

use anyhow::{ensure, Context};
use ztna_e2e::pcap::{count_occurrences, packets};
use ztna_e2e::status::in_tunnel_pool;
use ztna_e2e::{addr, helper_bins, random_hex, run, wait_until, Node, Signal, Stack};

#[test]
fn tunnel_basics() {
    run("tunnel_basics", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.start_all()?;
        let icmp_before = s.conn_metrics()?;

        t.step("ping -c 20 -i 0.2 10.100.0.1: no loss");
        let out = t.run_ok(
            Node::Agent,
            30,
            ["ping", "-n", "-c", "20", "-i", "0.2", addr::ECHO],
        )?;
        ensure!(
            out.stdout.contains("20 received") && out.stdout.contains(" 0% packet loss"),
            "ping lost packets:\n{out}"
        );

        t.step("ping -c 3 -s 1252 -M do 10.100.0.1: full 1280-byte packets with DF");
        let out = t.run_ok(
            Node::Agent,
            20,
            [
                "ping",
                "-n",
                "-c",
                "3",
                "-s",
                "1252",
                "-M",
                "do",
                addr::ECHO,
            ],
        )?;
        ensure!(
            out.stdout.contains("3 received"),
            "1280-byte pings were lost:\n{out}"
        );

        let icmp_after = s.conn_metrics()?;
        let backend_echoes = icmp_after.value("ztna_connector_icmp_echo_backend_total")
            - icmp_before.value("ztna_connector_icmp_echo_backend_total");
        ensure!(
            backend_echoes >= 23.0,
            "icmp = \"auto\" with unprivileged ICMP sockets allowed should send echo requests to the backend, \
             but ztna_connector_icmp_echo_backend_total rose by {backend_echoes} for 23 pings \
             (icmp_echo_local_total rose by {})",
            icmp_after.value("ztna_connector_icmp_echo_local_total")
                - icmp_before.value("ztna_connector_icmp_echo_local_total")
        );

        t.step(
            "ping shows the backend's real reachability: a backend that ignores echo gets no reply",
        );
        t.run_ok(
            Node::Backend,
            10,
            ["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1"],
        )?;
        let out = t.run(
            Node::Agent,
            10,
            ["ping", "-n", "-c", "2", "-W", "1", addr::ECHO],
        )?;
        t.run_ok(
            Node::Backend,
            10,
            ["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=0"],
        )?;
        ensure!(
            !out.status.success() && out.stdout.contains(" 0 received"),
            "the connector answered pings although the backend ignores them:\n{out}"
        );
        let out = t.run_ok(
            Node::Agent,
            10,
            ["ping", "-n", "-c", "1", "-W", "2", addr::ECHO],
        )?;
        ensure!(
            out.stdout.contains("1 received"),
            "ping did not come back:\n{out}"
        );

        t.step("1000 UDP datagrams of 1..=1232 bytes, echoed byte for byte");
        let summary = ztna_e2e::udp_echo_check(t, 1000, 1232)?;
        t.step(&summary);

        t.step("UDP datagrams up to 4000 bytes (the first is 4000): the agent's kernel fragments them, the connector reassembles them, the backend echoes them whole");
        let summary = ztna_e2e::udp_echo_check(t, 20, 4000)?;
        let m = s.conn_metrics()?;
        ensure!(
            m.value("ztna_connector_fragments_reassembled_total") >= 1.0
                && m.value("ztna_connector_dropped_fragments_total") == 0.0,
            "reassembly counters: {}",
            m.raw()
        );
        t.step(&format!(
            "RESULT {summary}; reassembled at the connector: {}",
            m.value("ztna_connector_fragments_reassembled_total")
        ));

        t.step("DNS through the tunnel: dig @10.100.0.2 backend.ztna.test");
        ztna_e2e::dig_backend(t, 2)?;

        t.step("the TUN device has MTU 1280");
        let out = t.host(5, ["ip", "-n", &t.ns(Node::Agent), "link", "show", "ztna0"])?;
        ensure!(
            out.success() && out.stdout.contains("mtu 1280 "),
            "ztna0 should exist with MTU 1280:\n{out}"
        );

        t.step("ztna-agent status --json");
        let st = s.status(&s.agent_cfg.status_socket)?;
        t.step(&st.json.to_string());
        ensure!(st.connected(), "status says not connected: {}", st.json);
        let ip = st.tunnel_ip().context("status has no tunnel_ip")?;
        ensure!(in_tunnel_pool(ip), "tunnel IP {ip} is not in 100.64.0.0/10");
        ensure!(
            st.identity() == Some("alice"),
            "identity is {:?}, expected alice",
            st.identity()
        );
        ensure!(
            st.connector_path("conn1") == Some("relay"),
            "conn1 path is {:?}",
            st.connector_path("conn1")
        );
        for field in ["tx_bytes", "rx_bytes", "tx_packets", "rx_packets"] {
            ensure!(
                st.connector_counter("conn1", field) > 0,
                "conn1 {field} is 0 after traffic: {}",
                st.json
            );
        }
        ensure!(
            st.connector_counter("conn1", "rx_bytes") > 1000 * 600,
            "conn1 rx_bytes {} is less than the UDP echoes alone",
            st.connector_counter("conn1", "rx_bytes")
        );

        t.step("the daemons' logs (files, not terminals) carry no escape codes");
        for (name, id) in [
            ("relay", s.relay),
            ("connector", s.connector),
            ("agent", s.agent),
        ] {
            let id = id.ok_or_else(|| anyhow::anyhow!("{name} is not running"))?;
            let log = t.log(id);
            ensure!(!log.is_empty(), "the {name} wrote no log");
            ensure!(
                !log.contains('\u{1b}'),
                "the {name}'s log has terminal escape codes:\n{}",
                log.lines().take(5).collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    });
}

#[test]
fn relay_is_blind() {
    run("relay_is_blind", helper_bins!(), |t| {
        let mut s = Stack::new(t)?;
        s.start_all()?;
        let marker = random_hex(16)?;
        t.step(&format!("marker {marker}"));

        let relay_pcap = t.dir().join("relay.pcap");
        let backend_pcap = t.dir().join("backend.pcap");
        let cap_relay = t.spawn(
            Node::Relay,
            "tcpdump-relay",
            "tcpdump",
            [
                "-U".as_ref(),
                "-n".as_ref(),
                "-i".as_ref(),
                "any".as_ref(),
                "-w".as_ref(),
                relay_pcap.as_os_str(),
            ],
        )?;
        // The control: the same capture on the connector<->backend link, where traffic is plain.
        let cap_backend = t.spawn(
            Node::Backend,
            "tcpdump-backend",
            "tcpdump",
            [
                "-U".as_ref(),
                "-n".as_ref(),
                "-i".as_ref(),
                "eth0".as_ref(),
                "-w".as_ref(),
                backend_pcap.as_os_str(),
            ],
        )?;
        for cap in [cap_relay, cap_backend] {
            wait_until("tcpdump to listen", Duration::from_secs(10), || {
                !t.is_running(cap) || t.log(cap).contains("listening on")
            })?;
            t.ensure_running(cap)?;
        }

        t.step("200 UDP datagrams carrying the marker through the tunnel");
        let target = format!("{}:7", addr::ECHO);
        let out = t.run_ok(
            Node::Agent,
            60,
            [
                t.helpers().udp_check.as_os_str(),
                target.as_ref(),
                "--count".as_ref(),
                "200".as_ref(),
                "--max-size".as_ref(),
                "1232".as_ref(),
                "--fill".as_ref(),
                marker.as_ref(),
            ],
        )?;
        t.step(out.stdout.trim());
        std::thread::sleep(Duration::from_millis(500));
        for cap in [cap_relay, cap_backend] {
            t.signal(cap, Signal::Int)?;
            t.wait_exit(cap, Duration::from_secs(10))?;
        }

        let relay_bytes = std::fs::read(&relay_pcap).context("reading the relay capture")?;
        let backend_bytes = std::fs::read(&backend_pcap).context("reading the backend capture")?;
        let relay_pkts = packets(&relay_bytes)?;
        let backend_pkts = packets(&backend_bytes)?;
        let relay_big = relay_pkts.iter().filter(|p| p.original >= 300).count();
        t.step(&format!(
            "relay capture: {} packets ({relay_big} of >= 300 bytes), {} bytes; backend capture: {} packets",
            relay_pkts.len(),
            relay_bytes.len(),
            backend_pkts.len()
        ));
        let in_backend = count_occurrences(&backend_bytes, marker.as_bytes());
        ensure!(
            in_backend >= 100,
            "control failed: the marker occurs only {in_backend} times in the plain connector-backend capture, \
             so the search would not prove anything"
        );
        ensure!(
            relay_big >= 200,
            "the relay capture holds only {relay_big} packets of >= 300 bytes; the tunnel traffic should have \
             crossed the relay (each echo 4 times)"
        );
        let in_relay = count_occurrences(&relay_bytes, marker.as_bytes());
        ensure!(
            in_relay == 0,
            "the marker occurs {in_relay} times in the relay's capture: the relay saw plaintext"
        );
        Ok(())
    });
}
