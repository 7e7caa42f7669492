//! One test's world: the namespaces built by `deploy/netns/topo.sh`, the daemons running in
//! them, their logs, and a per-test directory. Dropping a [`Topology`] stops every daemon
//! (SIGTERM, then SIGKILL after 3 s), runs `topo.sh down`, and, if the test did not pass,
//! prints the tail of every log and keeps the directory.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::DefaultHasher;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::HelperBins;

/// A node (network namespace) of the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// `${P}-wan`: the bridge `br0`, the "public" segment.
    Wan,
    /// `${P}-relay`: 10.10.0.1.
    Relay,
    /// `${P}-agent`: 10.10.0.2.
    Agent,
    /// `${P}-conn`: 10.10.0.3 and 10.10.3.1.
    Conn,
    /// `${P}-backend`: 10.10.3.2.
    Backend,
    /// Another node a later topology adds (`[a-z0-9]+`, e.g. a NAT router).
    Other(&'static str),
}

impl Node {
    /// The node's name, the suffix of its namespace.
    pub fn name(&self) -> &'static str {
        match self {
            Node::Wan => "wan",
            Node::Relay => "relay",
            Node::Agent => "agent",
            Node::Conn => "conn",
            Node::Backend => "backend",
            Node::Other(n) => n,
        }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A signal to send to a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Int,
    /// SIGTERM.
    Term,
    /// SIGKILL.
    Kill,
    /// SIGHUP (the relay reloads its policy).
    Hup,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Signal::Int => libc::SIGINT,
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Hup => libc::SIGHUP,
        }
    }
}

/// Handle of a daemon spawned by [`Topology::spawn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonId(usize);

struct Daemon {
    name: String,
    node: Node,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Daemon {
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit = Some(st);
            }
        }
        self.exit
    }
}

/// The result of a command run to completion.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit status (124 when `timeout` stopped it).
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CmdOutput {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` exited with {}", self.cmdline, self.status)?;
        if !self.stdout.trim().is_empty() {
            write!(f, "\n--- stdout ---\n{}", self.stdout.trim_end())?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "\n--- stderr ---\n{}", self.stderr.trim_end())?;
        }
        Ok(())
    }
}

/// Tests in one process run one at a time (unless `ZTNA_E2E_PARALLEL=1`): the machine has two
/// cores and the timing assertions should not depend on what the other tests do.
static SERIAL: Mutex<()> = Mutex::new(());

/// A built topology plus everything a test started in it. See the module docs.
pub struct Topology {
    name: String,
    prefix: String,
    dir: PathBuf,
    temp: RefCell<Option<tempfile::TempDir>>,
    helpers: HelperBins,
    topo_sh: PathBuf,
    daemons: RefCell<Vec<Daemon>>,
    passed: Cell<bool>,
    started: Instant,
    _serial: Option<MutexGuard<'static, ()>>,
}

impl Topology {
    /// Checks root and the binaries, picks a short unused prefix (`zt` + 6 hex digits), makes the
    /// test's directory and runs `topo.sh up PREFIX`.
    pub fn new(test_name: &str, helpers: HelperBins) -> Result<Self> {
        Self::build(test_name, helpers, "deploy/netns/topo.sh", &["up"], true)
    }

    /// Like [`Topology::new`], but the topology is built by `bash <workspace>/SCRIPT ARGS...`
    /// with the prefix inserted as the second argument, e.g.
    /// `with_script(name, helpers, "deploy/netns/nat.sh", &["up", "full", "sym"])` runs
    /// `nat.sh up PREFIX full sym`. Dropping it still runs `topo.sh down PREFIX`, which removes
    /// every namespace of the prefix.
    pub fn with_script(
        test_name: &str,
        helpers: HelperBins,
        script: &str,
        args: &[&str],
    ) -> Result<Self> {
        Self::build(test_name, helpers, script, args, true)
    }

    /// [`Topology::with_script`] for tests that run only the helper programs of this package
    /// (not ztna-relay, ztna-connector, ztna-agent), so it doesn't require those binaries.
    pub fn network_only(
        test_name: &str,
        helpers: HelperBins,
        script: &str,
        args: &[&str],
    ) -> Result<Self> {
        Self::build(test_name, helpers, script, args, false)
    }

    fn build(
        test_name: &str,
        helpers: HelperBins,
        script: &str,
        args: &[&str],
        ztna_bins: bool,
    ) -> Result<Self> {
        crate::require_root()?;
        if ztna_bins {
            for b in ["ztna-relay", "ztna-connector", "ztna-agent"] {
                crate::bin(b)?;
            }
        }
        let Some((verb, rest)) = args.split_first() else {
            bail!("{script}: no arguments (the first one is the verb, e.g. `up`)");
        };
        let build_sh = crate::workspace_root().join(script);
        if !build_sh.is_file() {
            bail!("{} is missing", build_sh.display());
        }
        for h in [&helpers.udp_echo, &helpers.udp_check] {
            if !h.is_file() {
                bail!(
                    "test helper {} is missing (it is built with this package)",
                    h.display()
                );
            }
        }
        let topo_sh = crate::workspace_root().join("deploy/netns/topo.sh");
        if !topo_sh.is_file() {
            bail!("{} is missing", topo_sh.display());
        }
        let serial = if std::env::var_os("ZTNA_E2E_PARALLEL").is_some_and(|v| v == "1") {
            None
        } else {
            Some(
                SERIAL
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            )
        };

        let prefix = choose_prefix(test_name)?;
        let safe_name: String = test_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let temp = tempfile::Builder::new()
            .prefix(&format!("ztna-e2e-{safe_name}-"))
            .tempdir()
            .context("creating the test's temporary directory")?;
        let dir = temp.path().to_path_buf();

        let topo = Self {
            name: test_name.to_owned(),
            prefix,
            dir,
            temp: RefCell::new(Some(temp)),
            helpers,
            topo_sh,
            daemons: RefCell::new(Vec::new()),
            passed: Cell::new(false),
            started: Instant::now(),
            _serial: serial,
        };
        topo.step(&format!(
            "topology {} up: {script} {} (test dir {})",
            topo.prefix,
            args.join(" "),
            topo.dir.display()
        ));
        let mut cmd = vec![
            OsStr::new("bash"),
            build_sh.as_os_str(),
            OsStr::new(verb),
            OsStr::new(&topo.prefix),
        ];
        cmd.extend(rest.iter().map(OsStr::new));
        let out = topo.host(30, cmd)?;
        if !out.success() {
            bail!("building the topology failed: {out}");
        }
        Ok(topo)
    }

    /// The namespace prefix, e.g. `zt1a2b3c`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace of `node`, e.g. `zt1a2b3c-agent`.
    pub fn ns(&self, node: Node) -> String {
        format!("{}-{}", self.prefix, node.name())
    }

    /// The test's directory (configs, PKI, logs, captures).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The helper programs.
    pub fn helpers(&self) -> &HelperBins {
        &self.helpers
    }

    /// Prints a progress line (shown by the test runner when the test fails, or with
    /// `--nocapture`).
    pub fn step(&self, msg: &str) {
        eprintln!(
            "[{:7.2}s {}] {msg}",
            self.started.elapsed().as_secs_f64(),
            self.name
        );
    }

    /// Writes `contents` to `name` inside the test's directory and returns the path.
    pub fn write_file(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        // A daemon may be reading the file (the relay polls its policy for reloads): write a
        // temporary file beside it and rename it over, so a reader sees the old or the new
        // contents, never half of them.
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(path)
    }

    /// Starts a long-running program in `node`'s namespace, with stdout and stderr going to
    /// `<dir>/<name>.log`. The daemon is stopped when the topology is dropped.
    pub fn spawn<I, S>(
        &self,
        node: Node,
        name: &str,
        program: impl AsRef<OsStr>,
        args: I,
    ) -> Result<DaemonId>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn_with_env(node, name, program, args, &[])
    }

    /// [`Topology::spawn`] with extra environment variables.
    pub fn spawn_with_env<I, S>(
        &self,
        node: Node,
        name: &str,
        program: impl AsRef<OsStr>,
        args: I,
        env: &[(&str, &str)],
    ) -> Result<DaemonId>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut daemons = self.daemons.borrow_mut();
        let mut file_name = format!("{name}.log");
        let mut n = 1;
        while daemons
            .iter()
            .any(|d| d.log.file_name().is_some_and(|f| f == file_name.as_str()))
        {
            n += 1;
            file_name = format!("{name}-{n}.log");
        }
        let log = self.dir.join(&file_name);
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        let program = program.as_ref();
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node)])
            .arg(program)
            .args(&args);
        clean_env(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {name} ({}) in {}",
                    program.to_string_lossy(),
                    self.ns(node)
                )
            })?;
        self.step(&format!(
            "started {name} in {node} (pid {}): {} {}",
            child.id(),
            program.to_string_lossy(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        daemons.push(Daemon {
            name: name.to_owned(),
            node,
            child,
            log,
            exit: None,
        });
        Ok(DaemonId(daemons.len() - 1))
    }

    /// The process id of a daemon (the program itself: `ip netns exec` execs it).
    pub fn pid(&self, id: DaemonId) -> Result<u32> {
        Ok(self
            .daemons
            .borrow()
            .get(id.0)
            .context("no such daemon")?
            .child
            .id())
    }

    /// Sends `sig` to a daemon. Does nothing if it already exited.
    pub fn signal(&self, id: DaemonId, sig: Signal) -> Result<()> {
        let mut daemons = self.daemons.borrow_mut();
        let d = daemons.get_mut(id.0).context("no such daemon")?;
        if d.poll().is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(d.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child, so
        // it can't have been recycled for another process.
        let rc = unsafe { libc::kill(pid, sig.raw()) };
        if rc != 0 {
            bail!(
                "kill({pid}, {sig:?}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        self.step(&format!("sent {sig:?} to {} (pid {pid})", d.name));
        Ok(())
    }

    /// Whether a daemon is still running.
    pub fn is_running(&self, id: DaemonId) -> bool {
        self.daemons
            .borrow_mut()
            .get_mut(id.0)
            .is_some_and(|d| d.poll().is_none())
    }

    /// Waits (bounded) for a daemon to exit and returns its status.
    pub fn wait_exit(&self, id: DaemonId, timeout: Duration) -> Result<ExitStatus> {
        let name = self
            .daemons
            .borrow()
            .get(id.0)
            .context("no such daemon")?
            .name
            .clone();
        crate::wait::wait_until_every(
            &format!("{name} to exit"),
            timeout,
            Duration::from_millis(50),
            || !self.is_running(id),
        )?;
        let st = self
            .daemons
            .borrow()
            .get(id.0)
            .and_then(|d| d.exit)
            .context("exit status lost")?;
        self.step(&format!("{name} exited: {st}"));
        Ok(st)
    }

    /// SIGKILLs a daemon and reaps it.
    pub fn kill(&self, id: DaemonId) -> Result<ExitStatus> {
        self.signal(id, Signal::Kill)?;
        self.wait_exit(id, Duration::from_secs(5))
    }

    /// Fails if the daemon has exited (e.g. right after start, with its log in the message).
    pub fn ensure_running(&self, id: DaemonId) -> Result<()> {
        if self.is_running(id) {
            return Ok(());
        }
        let d = self.daemons.borrow();
        let d = d.get(id.0).context("no such daemon")?;
        bail!(
            "{} exited unexpectedly ({}); last lines of {}:\n{}",
            d.name,
            d.exit.map(|s| s.to_string()).unwrap_or_default(),
            d.log.display(),
            tail(&std::fs::read_to_string(&d.log).unwrap_or_default(), 30)
        )
    }

    /// A daemon's log so far.
    pub fn log(&self, id: DaemonId) -> String {
        self.daemons
            .borrow()
            .get(id.0)
            .and_then(|d| std::fs::read_to_string(&d.log).ok())
            .unwrap_or_default()
    }

    /// A daemon's log file.
    pub fn log_path(&self, id: DaemonId) -> Option<PathBuf> {
        self.daemons.borrow().get(id.0).map(|d| d.log.clone())
    }

    /// Runs a command in `node`'s namespace under `timeout -k 2 SECS` and collects its output.
    pub fn run<I, S>(&self, node: Node, timeout_secs: u32, args: I) -> Result<CmdOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let ns = self.ns(node);
        let secs = timeout_secs.to_string();
        let mut full: Vec<std::ffi::OsString> =
            ["ip", "netns", "exec", &ns, "timeout", "-k", "2", &secs]
                .iter()
                .map(|s| s.into())
                .collect();
        full.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        let shown = format!(
            "[{node}] {}",
            full[8..]
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        run_command(&full, shown)
    }

    /// [`Topology::run`], failing unless the command exits 0.
    pub fn run_ok<I, S>(&self, node: Node, timeout_secs: u32, args: I) -> Result<CmdOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.run(node, timeout_secs, args)?;
        if !out.success() {
            bail!("{out}");
        }
        Ok(out)
    }

    /// Pings `target` from `node` `count` times (1 s apart, 2 s wait each) and fails unless every
    /// ping was answered.
    pub fn ping_all(&self, node: Node, target: &str, count: u32) -> Result<CmdOutput> {
        let n = count.to_string();
        let out = self.run_ok(
            node,
            15 + 3 * count,
            ["ping", "-n", "-c", &n, "-W", "2", target],
        )?;
        if !out.stdout.contains(&format!("{count} received")) {
            bail!("pings to {target} were lost:\n{out}");
        }
        Ok(out)
    }

    /// Runs a command in the root namespace (e.g. `ip -n NS route`) under `timeout`.
    pub fn host<I, S>(&self, timeout_secs: u32, args: I) -> Result<CmdOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let secs = timeout_secs.to_string();
        let mut full: Vec<std::ffi::OsString> = ["timeout", "-k", "2", &secs]
            .iter()
            .map(|s| s.into())
            .collect();
        full.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        let shown = full[4..]
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        run_command(&full, shown)
    }

    /// The last `lines` lines of every daemon's log, with a header per daemon.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for d in self.daemons.borrow_mut().iter_mut() {
            let state = match d.poll() {
                Some(st) => format!("exited: {st}"),
                None => "running".to_owned(),
            };
            let text =
                std::fs::read_to_string(&d.log).unwrap_or_else(|e| format!("(cannot read: {e})"));
            out.push_str(&format!(
                "===== {} in {} (pid {}, {state}) — last {lines} lines of {} =====\n{}\n",
                d.name,
                d.node,
                d.child.id(),
                d.log.display(),
                tail(&text, lines)
            ));
        }
        out
    }

    /// Marks the test as passed: no log tails are printed, and the directory is removed.
    pub fn mark_passed(&self) {
        self.passed.set(true);
    }

    fn stop_all(&self) {
        let mut daemons = self.daemons.borrow_mut();
        for d in daemons.iter_mut() {
            if d.poll().is_none() {
                if let Ok(pid) = libc::pid_t::try_from(d.child.id()) {
                    // SAFETY: our own unreaped child; see `signal`.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && daemons.iter_mut().any(|d| d.poll().is_none()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for d in daemons.iter_mut() {
            if d.poll().is_none() {
                eprintln!(
                    "[{}] {} did not exit 3 s after SIGTERM; sending SIGKILL",
                    self.name, d.name
                );
                let _ = d.child.kill();
                if let Ok(st) = d.child.wait() {
                    d.exit = Some(st);
                }
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let failed = std::thread::panicking() || !self.passed.get();
        if failed {
            eprintln!(
                "\n########## {} FAILED — daemon logs (topology {}, dir {}) ##########\n{}",
                self.name,
                self.prefix,
                self.dir.display(),
                self.log_tails(60)
            );
        }
        let stopping = Instant::now();
        self.stop_all();
        let stopped = stopping.elapsed();
        match self.host(
            30,
            [
                OsStr::new("bash"),
                self.topo_sh.as_os_str(),
                OsStr::new("down"),
                OsStr::new(&self.prefix),
            ],
        ) {
            Ok(out) if out.success() => {}
            Ok(out) => eprintln!("[{}] topo.sh down failed: {out}", self.name),
            Err(e) => eprintln!("[{}] topo.sh down failed: {e:#}", self.name),
        }
        self.step(&format!(
            "torn down: daemons stopped in {:.2} s, topology {} removed in {:.2} s",
            stopped.as_secs_f64(),
            self.prefix,
            (stopping.elapsed() - stopped).as_secs_f64()
        ));
        let keep = failed || std::env::var_os("ZTNA_E2E_KEEP").is_some_and(|v| v == "1");
        if let Some(temp) = self.temp.borrow_mut().take() {
            if keep {
                let path = temp.keep();
                eprintln!("[{}] kept the test directory {}", self.name, path.display());
            }
        }
    }
}

/// Removes `ZTNA_*` and `RUST_LOG` inherited from the test's environment (e.g. `ZTNA_BIN_DIR`,
/// which a daemon would read as a config key) and sets the daemons' log filter.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_str()
            .is_some_and(|k| k.starts_with("ZTNA_") || k == "RUST_LOG")
        {
            cmd.env_remove(&k);
        }
    }
    let filter = std::env::var("ZTNA_E2E_LOG").unwrap_or_else(|_| "info".to_owned());
    // No NO_COLOR: the daemons must write plain logs to a file by themselves
    // (tunnel_basics checks it).
    cmd.env("ZTNA_LOG", filter)
        .env("RUST_BACKTRACE", "1")
        .env_remove("NO_COLOR");
}

fn run_command(full: &[std::ffi::OsString], shown: String) -> Result<CmdOutput> {
    let (program, args) = full.split_first().context("empty command")?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    clean_env(&mut cmd);
    let out = cmd.output().with_context(|| format!("running `{shown}`"))?;
    Ok(CmdOutput {
        cmdline: shown,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `zt` + 6 hex digits from the pid, the test name and the clock, not used by any namespace.
fn choose_prefix(test_name: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running `ip netns list`")?;
    if !out.status.success() {
        bail!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let existing = String::from_utf8_lossy(&out.stdout).into_owned();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for attempt in 0u32..64 {
        let mut h = DefaultHasher::new();
        (std::process::id(), test_name, nanos, attempt).hash(&mut h);
        let prefix = format!("zt{:06x}", h.finish() & 0xff_ffff);
        let taken = existing
            .lines()
            .any(|l| l.starts_with(&format!("{prefix}-")));
        if !taken {
            return Ok(prefix);
        }
    }
    bail!("no free namespace prefix found after 64 tries")
}

#[cfg(test)]
mod tests {
    /// `topo.sh down` deletes every namespace of the prefix even when a process listed in one
    /// is gone before the kill reaches it (kill fails, xargs exits 123). Under the script's
    /// `set -euo pipefail` that stopped it before the deletions, and a passing test
    /// (`tcp_close_refused_unreachable`, whose SYN-flood clients exit as it ends) left its five
    /// namespaces behind. `ip` is a shell function here: nothing is created or deleted.
    #[test]
    fn topo_down_deletes_the_namespaces_when_a_listed_process_is_already_gone() {
        let topo = crate::workspace_root().join("deploy/netns/topo.sh");
        let script = r#"
set -euo pipefail
source "$1"
deleted=()
ip() {
    case "$1 $2" in
        "netns list") printf '%s\n' zttst0-agent zttst0-relay other-agent ;;
        "netns pids") echo 2147483647 ;; # no such process: it exited a moment ago
        "netns del") deleted+=("$3") ;;
        *) return 1 ;;
    esac
}
sleep() { :; }
topo_down zttst0
echo "deleted: ${deleted[*]}"
"#;
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg("topo-test")
            .arg(&topo)
            .output()
            .expect("bash runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "topo_down failed: {}; {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), "deleted: zttst0-agent zttst0-relay");
    }
}
