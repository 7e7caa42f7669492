//! `ztna-relay`: runs the relay, or mints the organisation's PKI.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ztna_core::pki::{self, CertificateAuthority};
use ztna_proto::Role;
use ztna_relay::config::{Flags, RelayConfig};
use ztna_relay::server::Server;

#[derive(Parser)]
#[command(
    name = "ztna-relay",
    version,
    about = "ztna relay: authenticates peers, enforces policy, forwards channels blind"
)]
struct Cli {
    /// Config file (TOML, or JSON if it ends in .json).
    #[arg(long, short, global = true, env = "ZTNA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Run,
    /// Manage the organisation's certificate authority.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA: writes DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Organisation name.
        #[arg(long, default_value = "ztna")]
        org: String,
    },
    /// Issue a certificate signed by DIR/ca.*: writes DIR/NAME.pem and DIR/NAME.key (mode 0600).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// relay, connector or agent.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Identity name (relays and connectors: a DNS name clients will verify).
        #[arg(long)]
        name: String,
        /// Group the identity belongs to (agents; repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Extra IP address SAN (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("unknown role {s:?}: use relay, connector or agent"))
}

fn pki_init(dir: &Path, org: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = CertificateAuthority::generate(org)?;
    pki::write_new(&dir.join("ca.pem"), &ca.cert_pem(), false)?;
    pki::write_new(&dir.join("ca.key"), &ca.key_pem(), true)?;
    println!(
        "wrote {}/ca.pem and {}/ca.key",
        dir.display(),
        dir.display()
    );
    Ok(())
}

fn pki_issue(
    dir: &Path,
    role: Role,
    name: &str,
    groups: &[String],
    ips: &[IpAddr],
) -> anyhow::Result<()> {
    let ca = CertificateAuthority::load(dir)
        .context("loading the CA (run `ztna-relay pki init` first)")?;
    let issued = ca.issue(role, name, groups, ips)?;
    pki::write_new(&dir.join(format!("{name}.pem")), &issued.cert_pem, false)?;
    pki::write_new(&dir.join(format!("{name}.key")), &issued.key_pem, true)?;
    println!(
        "wrote {}/{name}.pem and {}/{name}.key ({role})",
        dir.display(),
        dir.display()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    ztna_core::daemon::exit_code("ztna-relay", run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Pki {
            command: PkiCommand::Init { dir, org },
        } => pki_init(&dir, &org),
        Command::Pki {
            command:
                PkiCommand::Issue {
                    dir,
                    role,
                    name,
                    groups,
                    ips,
                },
        } => pki_issue(&dir, role, &name, &groups, &ips),
        Command::Run => {
            let cfg = RelayConfig::load(cli.config.as_deref(), &cli.flags)
                .map_err(|e| e.context(ztna_core::daemon::InvalidConfig))?;
            ztna_core::daemon::init_logging(cli.flags.log.as_deref(), cfg.log.as_deref());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let server = Server::bind(&cfg)?;
                ztna_core::daemon::notify_ready(&format!(
                    "listening on UDP {}",
                    server.local_addr()?
                ));
                tokio::spawn(ztna_core::daemon::watchdog());
                let stop = async {
                    ztna_core::daemon::shutdown_signal().await;
                    ztna_core::daemon::notify_stopping();
                };
                server.run(stop).await
            })
        }
    }
}
