//! `ztna-agent`, the Linux agent of ztna: it brings up a TUN device, assigns the tunnel IP the
//! relay hands out, routes the allowed services' addresses into the tunnel, and moves packets
//! between the device and the tunnel core (`ztna_core::agent`).
//!
//! - `ztna-agent up [--config FILE]` runs the agent until SIGINT or SIGTERM (root or
//!   CAP_NET_ADMIN).
//! - `ztna-agent status [--socket PATH] [--json]` asks the running agent how it is doing.
//!
//! Exit codes of `up`: 0 after SIGINT or SIGTERM; 1 for any other error (config, privileges,
//! device); 2 for a usage error; and when the relay refuses the agent for good (after three
//! attempts): 3 the relay rejected this agent's certificate (unknown CA, expired, revoked),
//! 4 this agent does not trust the relay's certificate, 5 the relay's policy denies this identity.
//!
//! Modules: [`config`] (figment layering and validation), [`tun`] (the device and the packet
//! loops), [`netlink`] (address and routes), [`status`](mod@status) (status socket, client and printer),
//! [`up`](mod@up) (the lifecycle that ties them together).

mod config;
mod monitor;
mod netlink;
mod resolved;
mod status;
mod tun;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{Overrides, Sources};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "ztna-agent",
    version,
    about = "ztna agent: reach private services through the ztna tunnel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bring the tunnel up and keep it up until SIGINT or SIGTERM (needs root or CAP_NET_ADMIN).
    ///
    /// Config layers, lowest first: defaults, /etc/ztna/agent.toml, --config FILE, ZTNA_*
    /// environment variables, flags.
    Up(Box<UpArgs>),
    /// Show the running agent's status: relay, tunnel IP, connectors, paths, RTT and traffic.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Config file (TOML; JSON if the name ends in .json).
    #[arg(long, short = 'c', env = "ZTNA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The agent's status socket (default: `status_socket` from the config, else
    /// /run/ztna/agent.sock).
    #[arg(long, env = "ZTNA_STATUS_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    /// Config file to take `status_socket` from.
    #[arg(long, short = 'c', env = "ZTNA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up(*args),
        Command::Status(args) => status(args),
    };
    // A permanent refusal by the relay has its own exit code (3, 4 or 5); everything else goes
    // through the daemons' shared mapping (78 for an invalid configuration, 1 otherwise).
    if let Err(e) = &result {
        if let Some(r) = e.downcast_ref::<up::Refused>() {
            eprintln!("ztna-agent: {e:#}");
            return ExitCode::from(r.0.exit_code());
        }
    }
    ztna_core::daemon::exit_code("ztna-agent", result)
}

/// `ztna-agent up`.
fn up(args: UpArgs) -> anyhow::Result<()> {
    let cfg = Sources::standard(args.config.as_deref(), &args.overrides)
        .load()
        .map_err(|e| e.context(ztna_core::daemon::InvalidConfig))?;
    init_tracing(cfg.log.as_deref())?;
    tracing::debug!(config = %cfg, "configuration loaded");
    // One thread: the design measured a multi-thread runtime slower on 2 cores.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        tokio::spawn(ztna_core::daemon::watchdog());
        up::run(cfg).await
    })
}

/// `ztna-agent status`.
fn status(args: StatusArgs) -> anyhow::Result<()> {
    let path = match args.socket {
        Some(p) => p,
        None => Sources::standard(args.config.as_deref(), &Overrides::default()).status_socket()?,
    };
    let text = status::fetch(&path)?;
    if args.json {
        println!("{}", text.trim_end());
    } else {
        print!("{}", status::render(&status::parse(&text)?));
    }
    Ok(())
}

/// Logs to stderr, filtered by the `log` key (also `--log` and ZTNA_LOG), else RUST_LOG, else
/// `info`. netlink-packet-route warns about every kernel attribute newer than itself; that is
/// kept at ERROR unless the filter names the crate.
fn init_tracing(log: Option<&str>) -> anyhow::Result<()> {
    let (text, origin) = match log {
        Some(f) => (f.to_owned(), "log filter"),
        None => match std::env::var("RUST_LOG") {
            Ok(f) if !f.trim().is_empty() => (f, "RUST_LOG filter"),
            _ => ("info".to_owned(), "default filter"),
        },
    };
    let mut filter =
        EnvFilter::try_new(&text).with_context(|| format!("invalid {origin} {text:?}"))?;
    if !text.contains("netlink_packet_route") {
        filter = filter.add_directive(
            "netlink_packet_route=error"
                .parse()
                .context("parsing a built-in log directive")?,
        );
    }
    // Colour only on a terminal: a log file or the journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    Ok(())
}
