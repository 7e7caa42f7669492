//! What every ztna daemon does the same way: layered configuration, logging, shutdown signals,
//! readiness and watchdog notifications to systemd, exit codes, and UDP sockets with large
//! buffers.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use figment::providers::{Env, Format, Json, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// Aborts a spawned task when dropped: a task that must not outlive its owner (a connection's
/// helper, a watch) is held as `let _task = AbortOnDrop(tokio::spawn(...))`.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Exit status for an invalid configuration (`EX_CONFIG` of sysexits.h). The units in
/// `deploy/systemd/` don't restart a daemon that exits with it (`RestartPreventExitStatus=78`):
/// a restart would read the same configuration again.
pub const EXIT_CONFIG: u8 = 78;

/// Marks an error as a configuration error, so [`exit_code`] exits with [`EXIT_CONFIG`]:
/// `result.map_err(|e| e.context(InvalidConfig))`.
#[derive(Debug, Clone, Copy)]
pub struct InvalidConfig;

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid configuration")
    }
}

/// A daemon's exit status for the result of its `main`: 0 on success, [`EXIT_CONFIG`] when the
/// error is marked [`InvalidConfig`], 1 for any other error (worth a restart). Prints the error
/// chain on stderr, prefixed with `program`. (Command-line usage errors exit with 2, from clap.)
pub fn exit_code(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            if e.downcast_ref::<InvalidConfig>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Where a daemon's configuration comes from, lowest layer first (after the defaults): the
/// first of `system` that exists, `file` (`--config`, which must exist), `ZTNA_<KEY>`
/// environment variables for `env_keys` only (other programs' variables share the prefix), and
/// the command-line flags (whose `None` fields must be skipped when serialized). Files are
/// TOML, or JSON when the name ends in `.json`.
#[derive(Debug, Clone, Copy)]
pub struct ConfigSources<'a> {
    /// System-wide files; the first that exists is read.
    pub system: &'a [&'a Path],
    /// The `--config` file.
    pub file: Option<&'a Path>,
    /// Environment variable prefix, `ZTNA_` in production.
    pub env_prefix: &'a str,
    /// Keys the environment may set.
    pub env_keys: &'a [&'a str],
}

impl ConfigSources<'_> {
    /// The layered figment, without defaults (serde defaults or [`layered_config`] add them).
    /// Fails if the `--config` file does not exist.
    pub fn figment(&self, flags: &impl Serialize) -> anyhow::Result<Figment> {
        let mut fig = Figment::new();
        if let Some(system) = self.system.iter().find(|p| p.exists()) {
            fig = merge_file(fig, system);
        }
        if let Some(f) = self.file {
            anyhow::ensure!(f.exists(), "config file {} does not exist", f.display());
            fig = merge_file(fig, f);
        }
        Ok(fig
            .merge(
                Env::prefixed(self.env_prefix)
                    .only(self.env_keys)
                    .lowercase(true),
            )
            .merge(Serialized::defaults(flags)))
    }
}

/// Merges a config file: TOML, or JSON when its name ends in `.json`.
fn merge_file(fig: Figment, path: &Path) -> Figment {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        fig.merge(Json::file_exact(path))
    } else {
        fig.merge(Toml::file_exact(path))
    }
}

/// Extracts `T` from `fig`; the error says which source held the bad value ("loading config from
/// FILE", the environment or the flags) and is marked [`InvalidConfig`].
pub fn extract<T: DeserializeOwned>(fig: &Figment) -> anyhow::Result<T> {
    fig.extract().map_err(|e| {
        anyhow::anyhow!("{e}")
            .context(describe_source(&e))
            .context(InvalidConfig)
    })
}

/// "loading config from FILE" (or the environment or flags), from a figment error's metadata.
fn describe_source(e: &figment::Error) -> String {
    match e.metadata.as_ref() {
        Some(m) => match &m.source {
            Some(src) => format!("loading config from {src}"),
            None => format!("loading config from {}", m.name),
        },
        None => "loading config".into(),
    }
}

/// The configuration layered over `defaults` (see [`ConfigSources`]): the one loader of the
/// relay, the connector and the agent. Errors are marked [`InvalidConfig`].
pub fn layered_config<T: Serialize + DeserializeOwned>(
    defaults: &T,
    sources: &ConfigSources<'_>,
    flags: &impl Serialize,
) -> anyhow::Result<T> {
    let fig = Figment::from(Serialized::defaults(defaults)).merge(
        sources
            .figment(flags)
            .map_err(|e| e.context(InvalidConfig))?,
    );
    extract(&fig)
}

/// Deserializes a list of ports or port ranges given as integers or strings: `[53, "80",
/// "9000-9010"]`, or one of them alone (`53`, `"53,80"`, as an environment variable or a
/// Kubernetes value gives it). Yields the strings, for the caller's own range parser.
pub fn port_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Number(u64),
        Text(String),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ports {
        List(Vec<Port>),
        One(Port),
    }
    let text = |p: Port| match p {
        Port::Number(n) => vec![n.to_string()],
        Port::Text(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    Ok(match Ports::deserialize(d)? {
        Ports::List(v) => v.into_iter().flat_map(text).collect(),
        Ports::One(p) => text(p),
    })
}

/// The field names of the struct `T` deserializes from, in declaration order: the keys a config
/// struct accepts, for tests that hold `docs/config.md` to the code.
pub fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Grab<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Grab<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields taken"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Grab(&mut fields));
    fields
}

/// Panics unless each `(section, fields)` pair has exactly `fields` documented in `markdown`
/// (see [`documented_keys`]): the one check behind each daemon's `docs/config.md` test.
pub fn assert_documented(markdown: &str, sections: &[(&str, &[&str])]) {
    use std::collections::BTreeSet;
    for (section, fields) in sections {
        let documented: BTreeSet<String> = documented_keys(markdown, section).into_iter().collect();
        let code: BTreeSet<String> = fields.iter().map(|f| f.to_string()).collect();
        assert!(!code.is_empty(), "{section}: no fields");
        assert_eq!(
            documented, code,
            "docs/config.md, section \"{section}\", must list exactly the keys of the code"
        );
    }
}

/// The keys documented in the section `## {heading}` of a markdown reference: the first
/// backquoted word of each table row (`| \`key\` | ... |`), up to the next heading of level 2
/// or 3. Empty if the section is missing.
pub fn documented_keys(markdown: &str, heading: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut inside = false;
    for line in markdown.lines() {
        let line = line.trim();
        if line.starts_with("## ") || line.starts_with("### ") {
            inside = line.trim_start_matches('#').trim() == heading;
            continue;
        }
        if !inside || !line.starts_with('|') {
            continue;
        }
        let first = line.trim_start_matches('|').split('|').next().unwrap_or("");
        let mut ticks = first.split('`');
        if let (Some(_), Some(key)) = (ticks.next(), ticks.next()) {
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                keys.push(key.to_owned());
            }
        }
    }
    keys
}

/// Tells systemd the daemon is ready (`READY=1`, for `Type=notify` units) with a status line.
/// Does nothing outside systemd (no `NOTIFY_SOCKET`); a failure is logged, never fatal.
pub fn notify_ready(status: &str) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Tells systemd the daemon's current state (`STATUS=`, shown by `systemctl status`).
pub fn notify_status(status: &str) {
    notify(&[sd_notify::NotifyState::Status(status)]);
}

/// Tells systemd the daemon is stopping (`STOPPING=1`).
pub fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// Sends systemd's watchdog keep-alive (`WATCHDOG=1`) at half the unit's `WatchdogSec` from the
/// daemon's own runtime, so a stuck event loop gets the service restarted. Never resolves; pends
/// forever when the unit has no watchdog.
pub async fn watchdog() {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return std::future::pending().await;
    }
    let period = std::time::Duration::from_micros(usec / 2);
    tracing::debug!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        notify(&[sd_notify::NotifyState::Watchdog]);
    }
}

/// Logs to stderr. The filter is the first of: `flag` (`--log`), `ZTNA_LOG`, `RUST_LOG`,
/// `configured` (the config file's `log`), `info`.
pub fn init_logging(flag: Option<&str>, configured: Option<&str>) {
    let filter = flag
        .map(str::to_owned)
        .or_else(|| std::env::var("ZTNA_LOG").ok())
        .or_else(|| std::env::var("RUST_LOG").ok())
        .or_else(|| configured.map(str::to_owned))
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("invalid log filter {filter:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    // Colour only on a terminal: a log file or the journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A non-blocking UDP socket bound to `addr`, with send and receive buffers of `buffer` bytes
/// asked for (the kernel caps them at `net.core.{r,w}mem_max`). `[::]` is dual-stack whatever
/// `net.ipv6.bindv6only` says: IPv4 peers arrive as IPv4-mapped IPv6 addresses.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        sock.set_only_v6(false)?;
    }
    sock.bind(&addr.into())?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        bind: SocketAddr,
        name: String,
        #[serde(default, deserialize_with = "port_list")]
        ports: Vec<String>,
    }

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    }

    fn defaults() -> Cfg {
        Cfg {
            bind: "0.0.0.0:1".parse().unwrap(),
            name: "default".into(),
            ports: vec![],
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn layers_in_order_and_errors_name_their_source() {
        figment::Jail::expect_with(|jail| {
            let dir = jail.directory().to_path_buf();
            let system = dir.join("system.toml");
            let file = dir.join("file.json");
            jail.create_file(
                &system,
                "name = \"system\"\nports = [53, \"80\", \"9000-9010\"]\n",
            )?;
            jail.create_file(&file, r#"{"bind": "127.0.0.1:2"}"#)?;
            let missing = dir.join("missing.toml");
            let systems: [&Path; 2] = [&missing, &system];
            let src = ConfigSources {
                system: &systems,
                file: Some(&file),
                env_prefix: "ZTNA_",
                env_keys: &["bind", "name"],
            };
            let cfg: Cfg = layered_config(&defaults(), &src, &Flags::default()).unwrap();
            assert_eq!(cfg.name, "system");
            assert_eq!(cfg.bind, "127.0.0.1:2".parse().unwrap());
            assert_eq!(cfg.ports, ["53", "80", "9000-9010"]);
            // The environment beats the files, for its keys only; flags beat everything.
            jail.set_env("ZTNA_NAME", "env");
            jail.set_env("ZTNA_PORTS", "1");
            let cfg: Cfg = layered_config(&defaults(), &src, &Flags::default()).unwrap();
            assert_eq!((cfg.name.as_str(), cfg.ports.len()), ("env", 3));
            let flags = Flags {
                name: Some("flag".into()),
            };
            let cfg: Cfg = layered_config(&defaults(), &src, &flags).unwrap();
            assert_eq!(cfg.name, "flag");
            // A bad value: the error names the file and is a configuration error.
            jail.create_file(&file, r#"{"bind": "nowhere"}"#)?;
            let err = layered_config(&defaults(), &src, &flags).unwrap_err();
            assert!(err.downcast_ref::<InvalidConfig>().is_some());
            assert!(format!("{err:#}").contains("file.json"), "{err:#}");
            // A missing --config file is an error too.
            let gone = PathBuf::from("/nonexistent/ztna.toml");
            let src = ConfigSources {
                file: Some(&gone),
                ..src
            };
            let err = layered_config(&defaults(), &src, &flags).unwrap_err();
            assert!(err.downcast_ref::<InvalidConfig>().is_some());
            Ok(())
        });
    }

    #[test]
    fn ports_as_integers_or_strings() {
        #[derive(Deserialize)]
        struct P {
            #[serde(deserialize_with = "port_list")]
            p: Vec<String>,
        }
        let parse = |s: &str| {
            figment::Figment::from(Toml::string(s))
                .extract::<P>()
                .map(|p| p.p)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse("p = [53, \"80\"]").unwrap(), ["53", "80"]);
        assert_eq!(parse("p = 53").unwrap(), ["53"]);
        assert_eq!(parse("p = \"53, 5000-5010\"").unwrap(), ["53", "5000-5010"]);
        assert!(parse("p = [true]").is_err());
        let json: P = serde_json::from_str(r#"{"p": [7, "9"]}"#).unwrap();
        assert_eq!(json.p, ["7", "9"]);
    }

    #[test]
    fn fields_and_documented_keys() {
        assert_eq!(struct_fields::<Cfg>(), ["bind", "name", "ports"]);
        let md = "# x\n## a\n| key | d |\n|---|---|\n| `bind` | x |\n| `name` (`x`) | y |\n\
                  text `nope`\n### b\n| `other` | z |\n## c\n| `c1` | |\n";
        assert_eq!(documented_keys(md, "a"), ["bind", "name"]);
        assert_eq!(documented_keys(md, "b"), ["other"]);
        assert!(documented_keys(md, "missing").is_empty());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code("t", Ok(())), ExitCode::SUCCESS);
        let config = anyhow::anyhow!("bad key").context(InvalidConfig);
        assert_eq!(
            exit_code("t", Err(config.context("loading"))),
            ExitCode::from(EXIT_CONFIG)
        );
        assert_eq!(
            exit_code("t", Err(anyhow::anyhow!("socket"))),
            ExitCode::FAILURE
        );
    }
}
