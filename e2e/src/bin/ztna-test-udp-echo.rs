//! `ztna-test-udp-echo ADDR [ADDR...] [--exit-after SECS]`: a UDP echo server for the
//! end-to-end tests and the demo. It binds every ADDR (e.g. `10.10.3.2:7`) and sends every
//! datagram it receives back to its sender, unchanged. It exits by itself after `--exit-after`
//! seconds (default 1800), so a leaked server can't run forever.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: ztna-test-udp-echo ADDR [ADDR...] [--exit-after SECS]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztna-test-udp-echo: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut exit_after = 1800u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--exit-after" => {
                let v = args.next().ok_or(USAGE)?;
                exit_after = v.parse().map_err(|_| format!("bad --exit-after {v:?}"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            a => addrs.push(
                a.parse()
                    .map_err(|_| format!("bad address {a:?}\n{USAGE}"))?,
            ),
        }
    }
    if addrs.is_empty() {
        return Err(USAGE.to_owned());
    }

    let mut sockets = Vec::new();
    for addr in &addrs {
        let sock = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        sockets.push(sock);
    }
    for (sock, addr) in sockets.into_iter().zip(&addrs) {
        let addr = *addr;
        std::thread::spawn(move || serve(sock, addr));
        eprintln!("ztna-test-udp-echo: echoing on {addr}");
    }
    std::thread::sleep(Duration::from_secs(exit_after));
    eprintln!("ztna-test-udp-echo: exiting after {exit_after} s");
    Ok(())
}

fn serve(sock: UdpSocket, addr: SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let mut echoed = 0u64;
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Err(e) = sock.send_to(&buf[..n], peer) {
                    eprintln!("ztna-test-udp-echo: {addr}: send to {peer}: {e}");
                }
                echoed += 1;
                if echoed.is_power_of_two() {
                    eprintln!("ztna-test-udp-echo: {addr}: {echoed} datagrams echoed");
                }
            }
            Err(e) => {
                eprintln!("ztna-test-udp-echo: {addr}: receive: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
