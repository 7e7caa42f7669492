//! Credentials and identities: loading the organisation CA, a certificate and its key from PEM
//! files, building mutual-TLS configurations for quinn, and reading who a peer is from its
//! certificate.
//!
//! A ztna certificate names its holder in the subject common name, its role in a SAN URI
//! `urn:ztna:role:<role>`, and (for agents) its groups in SAN URIs `urn:ztna:group:<group>`.
//! Relay and connector certificates also carry their name as a DNS SAN, which clients verify as
//! the server name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use ztna_proto::control::Role;

/// SAN URI prefix that carries the role.
pub const ROLE_URI_PREFIX: &str = "urn:ztna:role:";
/// SAN URI prefix that carries a group.
pub const GROUP_URI_PREFIX: &str = "urn:ztna:group:";

/// Why credentials could not be loaded or a peer could not be identified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{what}: {detail}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The certificate could not be parsed or lacks the ztna identity fields.
    #[error("certificate identity: {0}")]
    Identity(String),
    /// The connection has no peer certificate.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
}

/// Paths of the CA certificate, the own certificate and the own private key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TlsFiles {
    /// The organisation CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM; may hold a chain).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The three paths from optional configuration values; the error names the first missing
    /// key and what it should point at.
    pub fn from_config(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let need = |v: Option<PathBuf>, key: &str, what: &str| {
            v.with_context(|| format!("missing `{key}`: path to {what} (PEM)"))
        };
        Ok(Self {
            ca: need(ca, "ca", "the organisation CA certificate")?,
            cert: need(cert, "cert", "this node's certificate")?,
            key: need(key, "key", "this node's private key")?,
        })
    }
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Identity name (subject common name).
    pub name: String,
    /// Role from the SAN URI.
    pub role: Role,
    /// Groups from SAN URIs (agents).
    pub groups: Vec<String>,
}

impl PeerIdentity {
    /// Reads the identity of a DER certificate.
    pub fn from_cert(der: &[u8]) -> Result<Self, TlsError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| TlsError::Identity("no subject common name".into()))?
            .to_owned();
        if !ztna_proto::service::is_valid_name(&name) {
            return Err(TlsError::Identity(format!(
                "invalid identity name {name:?}"
            )));
        }
        let mut role = None;
        let mut groups = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for gn in &san.value.general_names {
                if let GeneralName::URI(uri) = gn {
                    if let Some(r) = uri.strip_prefix(ROLE_URI_PREFIX) {
                        role = Role::parse(r);
                    } else if let Some(g) = uri.strip_prefix(GROUP_URI_PREFIX) {
                        groups.push(g.to_owned());
                    }
                }
            }
        }
        let role = role.ok_or_else(|| {
            TlsError::Identity(format!(
                "certificate of {name} has no {ROLE_URI_PREFIX}<role> SAN"
            ))
        })?;
        Ok(Self { name, role, groups })
    }

    /// Reads the identity of the peer of an established quinn connection.
    pub fn from_connection(conn: &quinn::Connection) -> Result<Self, TlsError> {
        let certs = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or(TlsError::NoPeerCertificate)?;
        let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
        Self::from_cert(leaf)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// Loaded credentials: trust roots, own chain and key, and own identity.
#[derive(Clone)]
pub struct Credentials {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    identity: PeerIdentity,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Credentials {
    /// Loads credentials from files.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        Self::from_pem(&read(&files.ca)?, &read(&files.cert)?, &read(&files.key)?)
    }

    /// Loads credentials from PEM bytes.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let pem_err = |what| {
            move |e: rustls::pki_types::pem::Error| TlsError::Pem {
                what,
                detail: e.to_string(),
            }
        };
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(ca.map_err(pem_err("CA certificate"))?)
                .map_err(|e| TlsError::Pem {
                    what: "CA certificate",
                    detail: e.to_string(),
                })?;
        }
        if roots.is_empty() {
            return Err(TlsError::Pem {
                what: "CA certificate",
                detail: "no certificate in file".into(),
            });
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("certificate"))?;
        let leaf = chain.first().ok_or(TlsError::Pem {
            what: "certificate",
            detail: "no certificate in file".into(),
        })?;
        let identity = PeerIdentity::from_cert(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(pem_err("private key"))?;
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            identity,
        })
    }

    /// This node's own identity, from its certificate.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// A quinn server crypto config that requires a client certificate issued by the CA.
    pub fn server_config(&self, alpn: &[u8]) -> Result<Arc<QuicServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let q = QuicServerConfig::try_from(cfg)
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        Ok(Arc::new(q))
    }

    /// A quinn client crypto config that presents this node's certificate and verifies the
    /// server against the CA (and the server name given at connect time).
    pub fn client_config(&self, alpn: &[u8]) -> Result<Arc<QuicClientConfig>, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let q = QuicClientConfig::try_from(cfg)
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        Ok(Arc::new(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    #[test]
    fn issued_identities_read_back() {
        let ca = pki::CertificateAuthority::generate("Test Org").unwrap();
        let agent = ca
            .issue(Role::Agent, "alice", &["eng".into(), "ops".into()], &[])
            .unwrap();
        let creds = Credentials::from_pem(
            ca.cert_pem().as_bytes(),
            agent.cert_pem.as_bytes(),
            agent.key_pem.as_bytes(),
        )
        .unwrap();
        assert_eq!(
            creds.identity(),
            &PeerIdentity {
                name: "alice".into(),
                role: Role::Agent,
                groups: vec!["eng".into(), "ops".into()]
            }
        );
        assert!(creds.client_config(b"x").is_ok());
        let relay = ca.issue(Role::Relay, "relay", &[], &[]).unwrap();
        let creds = Credentials::from_pem(
            ca.cert_pem().as_bytes(),
            relay.cert_pem.as_bytes(),
            relay.key_pem.as_bytes(),
        )
        .unwrap();
        assert_eq!(creds.identity().role, Role::Relay);
        assert!(creds.server_config(b"x").is_ok());
        assert!(!format!("{creds:?}").contains("PRIVATE"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Credentials::from_pem(b"nope", b"nope", b"nope").is_err());
        assert!(PeerIdentity::from_cert(&[0x30, 0x03, 1, 2, 3]).is_err());
    }
}
