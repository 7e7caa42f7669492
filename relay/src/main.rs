//! `ztna-relay`: runs the relay, or mints the organisation's PKI.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ztna_core::pki::{self, CertificateAuthority};
use ztna_proto::Role;
use ztna_relay::config::{Flags, RelayConfig, SYSTEM_CONFIG};
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
        /// Validity in days (default: 30 for agents, 397 for relays and connectors).
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..=pki::MAX_VALIDITY_DAYS))]
        days: Option<i64>,
    },
    /// Write a CRL signed by DIR/ca.* that revokes the given serials (as `issue` printed them);
    /// name it in `crls = [...]` of the relay and the connector.
    Crl {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Serial to revoke (hex, colons optional; repeatable).
        #[arg(long = "serial")]
        serials: Vec<String>,
        /// Days until the CRL's next update.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(i64).range(1..=pki::MAX_VALIDITY_DAYS))]
        days: i64,
        /// File to write (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
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

struct IssueArgs<'a> {
    role: Role,
    name: &'a str,
    groups: &'a [String],
    ips: &'a [IpAddr],
    days: Option<i64>,
}

fn pki_issue(dir: &Path, a: IssueArgs<'_>) -> anyhow::Result<()> {
    let ca = CertificateAuthority::load(dir)
        .context("loading the CA (run `ztna-relay pki init` first)")?;
    let days = a.days.unwrap_or_else(|| pki::default_validity_days(a.role));
    let issued = ca.issue_for_days(a.role, a.name, a.groups, a.ips, days)?;
    let name = a.name;
    pki::write_new(&dir.join(format!("{name}.pem")), &issued.cert_pem, false)?;
    pki::write_new(&dir.join(format!("{name}.key")), &issued.key_pem, true)?;
    println!(
        "wrote {}/{name}.pem and {}/{name}.key ({}, valid {days} days until {}, serial {})",
        dir.display(),
        dir.display(),
        a.role,
        issued.not_after.date(),
        ztna_core::tls::format_serial(&issued.serial)
    );
    Ok(())
}

fn pki_crl(dir: &Path, serials: &[String], days: i64, out: &Path) -> anyhow::Result<()> {
    let ca = CertificateAuthority::load(dir)
        .context("loading the CA (run `ztna-relay pki init` first)")?;
    let serials = serials
        .iter()
        .map(|s| {
            ztna_core::tls::parse_serial(s)
                .with_context(|| format!("serial {s:?} is not hex (like 1f:2a:03)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pem = ca.crl(&serials, days)?;
    // Written whole then renamed, so a relay polling the file never reads half of it.
    let tmp = out.with_extension("crl.tmp");
    std::fs::write(&tmp, pem).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} revoking {} certificate(s), next update in {days} days",
        out.display(),
        serials.len()
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
                    days,
                },
        } => pki_issue(
            &dir,
            IssueArgs {
                role,
                name: &name,
                groups: &groups,
                ips: &ips,
                days,
            },
        ),
        Command::Pki {
            command:
                PkiCommand::Crl {
                    dir,
                    serials,
                    days,
                    out,
                },
        } => pki_crl(&dir, &serials, days, &out),
        Command::Run => {
            let cfg = RelayConfig::load(cli.config.as_deref(), &cli.flags)
                .map_err(|e| e.context(ztna_core::daemon::InvalidConfig))?;
            ztna_core::daemon::init_logging(cli.flags.log.as_deref(), cfg.log.as_deref());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let server = Server::bind(&cfg)?;
                // The files whose change reloads the policy: the config layers that exist.
                let config_files: Vec<PathBuf> =
                    [Some(PathBuf::from(SYSTEM_CONFIG)), cli.config.clone()]
                        .into_iter()
                        .flatten()
                        .filter(|p| p.exists())
                        .collect();
                let (file, flags) = (cli.config.clone(), cli.flags.clone());
                let reload = tokio::spawn(ztna_relay::reload::run(
                    server.relay().clone(),
                    config_files,
                    &cfg,
                    move || RelayConfig::load(file.as_deref(), &flags),
                ));
                ztna_core::daemon::notify_ready(&format!(
                    "listening on UDP {}",
                    server.local_addr()?
                ));
                tokio::spawn(ztna_core::daemon::watchdog());
                let stop = async {
                    ztna_core::daemon::shutdown_signal().await;
                    ztna_core::daemon::notify_stopping();
                };
                let result = server.run(stop).await;
                reload.abort();
                result
            })
        }
    }
}
