//! An organisation PKI minted with the real `ztna-relay pki init` / `pki issue`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The role a certificate is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The relay (DNS-like name, e.g. `relay`).
    Relay,
    /// A connector (DNS-like name, e.g. `conn1`).
    Connector,
    /// An agent (a person, e.g. `alice`, with groups).
    Agent,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Relay => "relay",
            Role::Connector => "connector",
            Role::Agent => "agent",
        })
    }
}

/// A certificate and its key, as written by `pki issue`.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// `DIR/NAME.pem`.
    pub cert: PathBuf,
    /// `DIR/NAME.key`.
    pub key: PathBuf,
}

/// A directory holding one CA (`ca.pem`, `ca.key`) and the certificates it issued.
#[derive(Debug)]
pub struct PkiDir {
    dir: PathBuf,
    relay_bin: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl PkiDir {
    /// Mints a CA into a new temporary directory (removed when this value is dropped).
    pub fn new(org: Option<&str>) -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("ztna-pki-")
            .tempdir()
            .context("creating a temporary directory for the PKI")?;
        let mut pki = Self::init(temp.path(), org)?;
        pki._temp = Some(temp);
        Ok(pki)
    }

    /// Mints a CA into `dir` (created if missing), which the caller owns.
    pub fn init(dir: &Path, org: Option<&str>) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Self {
            dir: dir.to_path_buf(),
            relay_bin: crate::bin("ztna-relay")?,
            _temp: None,
        };
        let mut args = vec![
            "pki".to_owned(),
            "init".to_owned(),
            "--dir".to_owned(),
            path_str(dir)?,
        ];
        if let Some(org) = org {
            args.extend(["--org".to_owned(), org.to_owned()]);
        }
        pki.relay(&args)?;
        for f in ["ca.pem", "ca.key"] {
            if !dir.join(f).is_file() {
                bail!(
                    "`ztna-relay pki init` succeeded but wrote no {}",
                    dir.join(f).display()
                );
            }
        }
        Ok(pki)
    }

    /// Issues a certificate for `name` in `role`, with `groups` (agents), signed by this CA.
    pub fn issue(&self, role: Role, name: &str, groups: &[&str]) -> Result<CertPaths> {
        let mut args = vec![
            "pki".to_owned(),
            "issue".to_owned(),
            "--dir".to_owned(),
            path_str(&self.dir)?,
            "--role".to_owned(),
            role.to_string(),
            "--name".to_owned(),
            name.to_owned(),
        ];
        for g in groups {
            args.extend(["--group".to_owned(), (*g).to_owned()]);
        }
        self.relay(&args)?;
        let paths = CertPaths {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        for f in [&paths.cert, &paths.key] {
            if !f.is_file() {
                bail!(
                    "`ztna-relay pki issue` succeeded but wrote no {}",
                    f.display()
                );
            }
        }
        Ok(paths)
    }

    /// The CA certificate, `DIR/ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn relay(&self, args: &[String]) -> Result<()> {
        let out = Command::new(&self.relay_bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.relay_bin.display()))?;
        if !out.status.success() {
            bail!(
                "`ztna-relay {}` failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

pub(crate) fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}
