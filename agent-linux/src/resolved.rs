//! Split DNS on Linux: registers the agent's DNS server and match domains with systemd-resolved
//! for the TUN link (`resolvectl dns`, `resolvectl domain` with `~` routing-only domains,
//! `resolvectl default-route no`), so that only queries for those domains reach the agent and
//! every other query goes to the host's normal resolver untouched. `resolvectl revert` removes
//! it on exit (the link's deletion removes it too).
//!
//! Without systemd-resolved the agent changes nothing (it never rewrites `/etc/resolv.conf`)
//! and logs what to configure instead.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use ztna_core::dns::SplitDns;

/// systemd-resolved's runtime directory; present while it runs.
const RESOLVED_RUNTIME: &str = "/run/systemd/resolve";

/// The TUN link's split DNS with systemd-resolved.
pub(crate) struct Resolved {
    link: String,
    warned: bool,
}

impl Resolved {
    pub(crate) fn new(link: &str) -> Self {
        Self {
            link: link.to_owned(),
            warned: false,
        }
    }

    fn available() -> bool {
        Path::new(RESOLVED_RUNTIME)
            .join("io.systemd.Resolve")
            .exists()
    }

    fn resolvectl(args: &[&str]) -> Result<(), String> {
        match Command::new("resolvectl").args(args).output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Removes the split DNS settings of `link` (on exit), if systemd-resolved runs.
pub(crate) fn revert(link: &str) {
    if Resolved::available() {
        match Resolved::resolvectl(&["revert", link]) {
            Ok(()) => tracing::debug!(%link, "split DNS settings removed"),
            Err(e) => {
                tracing::warn!(%link, error = %e, "could not remove the split DNS settings")
            }
        }
    }
}

/// The `resolvectl` argument lists that route `domains` to `server` on `link`.
pub(crate) fn commands(link: &str, server: SocketAddr, domains: &[String]) -> Vec<Vec<String>> {
    let server = if server.port() == 53 {
        server.ip().to_string()
    } else {
        server.to_string()
    };
    let mut domain = vec!["domain".to_owned(), link.to_owned()];
    domain.extend(domains.iter().map(|d| format!("~{d}")));
    vec![
        vec!["dns".to_owned(), link.to_owned(), server],
        domain,
        vec!["default-route".to_owned(), link.to_owned(), "no".to_owned()],
    ]
}

impl SplitDns for Resolved {
    fn apply(&mut self, server: SocketAddr, domains: &[String]) {
        if !Self::available() {
            if !self.warned {
                self.warned = true;
                tracing::warn!(
                    %server,
                    domains = %domains.join(","),
                    "systemd-resolved is not running: /etc/resolv.conf is left alone; send DNS queries for these domains to this server (e.g. a dnsmasq `server=/DOMAIN/IP` line per domain) to use name services"
                );
            }
            return;
        }
        for args in commands(&self.link, server, domains) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = Self::resolvectl(&args) {
                tracing::warn!(link = %self.link, error = %e, "resolvectl {} failed", args.join(" "));
                return;
            }
        }
        tracing::info!(link = %self.link, %server, domains = domains.len(), "split DNS registered with systemd-resolved");
        tracing::debug!(link = %self.link, domains = %domains.join(","), "split DNS domains");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvectl_arguments() {
        let c = commands(
            "ztna0",
            "100.64.0.2:53".parse().unwrap(),
            &["corp.example".into(), "wiki.example.org".into()],
        );
        assert_eq!(c[0], vec!["dns", "ztna0", "100.64.0.2"]);
        assert_eq!(
            c[1],
            vec!["domain", "ztna0", "~corp.example", "~wiki.example.org"]
        );
        assert_eq!(c[2], vec!["default-route", "ztna0", "no"]);
        let c = commands("ztna0", "100.64.0.2:5353".parse().unwrap(), &[]);
        assert_eq!(c[0], vec!["dns", "ztna0", "100.64.0.2:5353"]);
    }
}
