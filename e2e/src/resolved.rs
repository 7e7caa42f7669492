//! A real systemd-resolved in a test's agent namespace, without touching the host: a private
//! D-Bus system bus and systemd-resolved (unpacked by `scripts/setup.sh` into
//! `/opt/ztna-resolved`, not installed) run in a mount namespace of their own inside the agent's
//! network namespace, with tmpfs on `/run/systemd` and `/run/dbus`, a `systemd-resolve` user in
//! bind-mounted copies of `/etc/passwd` and `/etc/group`, a `resolved.conf` whose global DNS
//! server is the test's "normal resolver", and an `/etc/resolv.conf` pointing glibc at
//! resolved's stub (127.0.0.53). Programs that should see it (the agent, `getent`,
//! `resolvectl`) run through [`Resolved::cmd`] (`nsenter` into that mount namespace).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{wait_until, DaemonId, Node, Topology};

/// Where `scripts/setup.sh` unpacks the systemd-resolved package (`ZTNA_RESOLVED_ROOT`
/// overrides).
pub fn root() -> PathBuf {
    std::env::var_os("ZTNA_RESOLVED_ROOT")
        .map_or_else(|| PathBuf::from("/opt/ztna-resolved"), PathBuf::from)
}

/// The running bus and resolver.
pub struct Resolved {
    /// The bus daemon, whose mount namespace everything here shares.
    pub bus: DaemonId,
    /// systemd-resolved.
    pub resolved: DaemonId,
    bus_pid: u32,
}

impl Resolved {
    /// Starts the bus and systemd-resolved in the agent namespace, with `global_dns` (an
    /// address) as resolved's DNS server for names no link claims; waits until `resolvectl`
    /// answers.
    pub fn start(t: &Topology, global_dns: &str) -> Result<Self> {
        let root = root();
        let daemon = root.join("lib/systemd/systemd-resolved");
        if !daemon.is_file() {
            bail!(
                "{} is missing: run scripts/setup.sh (it unpacks systemd-resolved there)",
                daemon.display()
            );
        }
        let dir = t.dir().join("resolved");
        std::fs::create_dir_all(&dir).context("creating the resolved directory")?;
        // A uid and gid no account of the host has.
        let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
        let group = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
        let used = |text: &str| -> Vec<u32> {
            text.lines()
                .filter_map(|l| l.split(':').nth(2)?.parse().ok())
                .collect()
        };
        let (uids, gids) = (used(&passwd), used(&group));
        let id = (900..1000)
            .rev()
            .find(|i| !uids.contains(i) && !gids.contains(i))
            .context("no free system uid for systemd-resolve")?;
        let with_user = |text: &str, line: String| {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("systemd-resolve:"))
                .collect();
            format!("{}\n{line}\n", kept.join("\n"))
        };
        std::fs::write(
            dir.join("passwd"),
            with_user(
                &passwd,
                format!("systemd-resolve:x:{id}:{id}::/:/usr/sbin/nologin"),
            ),
        )?;
        std::fs::write(
            dir.join("group"),
            with_user(&group, format!("systemd-resolve:x:{id}:")),
        )?;
        std::fs::write(
            dir.join("resolved.conf"),
            format!("[Resolve]\nDNS={global_dns}\nLLMNR=no\nMulticastDNS=no\nDNSSEC=no\n"),
        )?;
        std::fs::write(
            dir.join("resolv.conf"),
            "nameserver 127.0.0.53\noptions edns0 trust-ad timeout:2 attempts:2\n",
        )?;
        std::fs::write(
            dir.join("bus.conf"),
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
             <busconfig>\n  <type>system</type>\n  \
             <listen>unix:path=/run/dbus/system_bus_socket</listen>\n  <auth>EXTERNAL</auth>\n  \
             <policy context=\"default\">\n    <allow user=\"*\"/>\n    <allow own=\"*\"/>\n    \
             <allow send_destination=\"*\"/>\n    <allow receive_sender=\"*\"/>\n  </policy>\n\
             </busconfig>\n",
        )?;
        let d = dir.display();
        let script = format!(
            "set -e\n\
             mkdir -p /run/systemd /run/dbus /etc/systemd\n\
             mount -t tmpfs ztna-test /run/systemd\n\
             mount -t tmpfs ztna-test /run/dbus\n\
             mount --bind {d}/passwd /etc/passwd\n\
             mount --bind {d}/group /etc/group\n\
             touch /etc/systemd/resolved.conf 2>/dev/null || true\n\
             mount --bind {d}/resolved.conf /etc/systemd/resolved.conf\n\
             mount --bind {d}/resolv.conf /etc/resolv.conf\n\
             mkdir -p /run/systemd/resolve\n\
             chown {id}:{id} /run/systemd/resolve\n\
             exec dbus-daemon --config-file={d}/bus.conf --nofork --nopidfile\n"
        );
        let script_path = dir.join("bus.sh");
        std::fs::write(&script_path, script)?;
        let bus = t.spawn(
            Node::Agent,
            "dbus",
            "unshare",
            [
                OsString::from("-m"),
                "--propagation".into(),
                "private".into(),
                "bash".into(),
                script_path.into_os_string(),
            ],
        )?;
        let bus_pid = t.pid(bus)?;
        let socket_up = || {
            t.run(
                Node::Agent,
                5,
                nsenter(bus_pid, ["test", "-S", "/run/dbus/system_bus_socket"]),
            )
            .is_ok_and(|o| o.success())
        };
        wait_until(
            "the test's D-Bus to listen",
            Duration::from_secs(10),
            || !t.is_running(bus) || socket_up(),
        )?;
        t.ensure_running(bus)?;
        let argv = nsenter(bus_pid, [daemon.into_os_string()]);
        let resolved = t.spawn(Node::Agent, "systemd-resolved", &argv[0], &argv[1..])?;
        let me = Self {
            bus,
            resolved,
            bus_pid,
        };
        wait_until(
            "systemd-resolved to answer",
            Duration::from_secs(10),
            || {
                !t.is_running(resolved)
                    || me
                        .run(t, 5, ["resolvectl", "status"])
                        .is_ok_and(|o| o.success())
            },
        )?;
        t.ensure_running(resolved)?;
        t.step(&format!(
            "systemd-resolved up in the agent namespace (global DNS {global_dns}, stub 127.0.0.53)"
        ));
        Ok(me)
    }

    /// `args` as a command line run in the resolver's mount namespace (`nsenter -t PID -m --`),
    /// with `resolvectl` on `PATH`.
    pub fn cmd<I, S>(&self, args: I) -> Vec<OsString>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let path = format!(
            "PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            root().join("usr/bin").display()
        );
        let mut v: Vec<OsString> = vec!["env".into(), path.into()];
        v.extend(args.into_iter().map(Into::into));
        nsenter(self.bus_pid, v)
    }

    /// Starts `program ARGS...` in the agent namespace as a daemon of the topology (its log
    /// `NAME.log`), in the resolver's mount namespace with `env` added.
    pub fn spawn<I, S>(
        &self,
        t: &Topology,
        name: &str,
        program: impl Into<OsString>,
        args: I,
        env: &[(&str, &str)],
    ) -> Result<DaemonId>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut all = vec![program.into()];
        all.extend(args.into_iter().map(Into::into));
        let argv = self.cmd(all);
        t.spawn_with_env(Node::Agent, name, &argv[0], &argv[1..], env)
    }

    /// Runs `args` in the agent namespace as [`Resolved::cmd`] does.
    pub fn run<I, S>(&self, t: &Topology, timeout_secs: u32, args: I) -> Result<crate::CmdOutput>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        t.run(Node::Agent, timeout_secs, self.cmd(args))
    }
}

/// `nsenter -t PID -m -- ARGS...`.
fn nsenter<I, S>(pid: u32, args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut v: Vec<OsString> = vec![
        "nsenter".into(),
        "-t".into(),
        pid.to_string().into(),
        "-m".into(),
        "--".into(),
    ];
    v.extend(args.into_iter().map(Into::into));
    v
}
