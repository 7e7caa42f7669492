//! Credentials and identities: loading the organisation CA, a certificate and its key from PEM
//! files, building mutual-TLS configurations for quinn, and reading who a peer is from its
//! certificate.
//!
//! A ztna certificate names its holder in the subject common name, its role in a SAN URI
//! `urn:ztna:role:<role>`, and (for agents) its groups in SAN URIs `urn:ztna:group:<group>`.
//! Relay and connector certificates also carry their name as a DNS SAN, which clients verify as
//! the server name.
//!
//! Servers (the relay, and the connector for inner connections) verify client certificates with
//! [`Revocation`]: the CA chain and validity (webpki, with CRLs when configured), a valid ztna
//! identity, and a hot-reloadable deny list of identities and serial numbers. What a refused
//! client learns is the TLS alert (see `ztna_proto::control::Refusal`).

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use ztna_proto::control::Role;
use ztna_proto::service::{check_name, escape_for_log};

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
        check_name("identity name", &name).map_err(TlsError::Identity)?;
        let mut role = None;
        let mut groups = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for gn in &san.value.general_names {
                if let GeneralName::URI(uri) = gn {
                    if let Some(r) = uri.strip_prefix(ROLE_URI_PREFIX) {
                        role = Role::parse(r);
                    } else if let Some(g) = uri.strip_prefix(GROUP_URI_PREFIX) {
                        check_name("group", g).map_err(TlsError::Identity)?;
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

/// The serial number of a DER certificate: big-endian, without leading zero bytes (the form
/// [`RevocationList::serials`] holds and [`format_serial`] prints).
pub fn cert_serial(der: &[u8]) -> Result<Vec<u8>, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
    Ok(normalize_serial(cert.raw_serial()))
}

/// The serial of the peer certificate of an established connection.
pub fn peer_serial(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())?;
    cert_serial(certs.first()?).ok()
}

fn normalize_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].to_vec()
}

/// A serial as lowercase hex bytes joined by `:` (what `ztna-relay pki issue` prints and the
/// deny list takes).
pub fn format_serial(serial: &[u8]) -> String {
    serial
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses a serial written as hex, with optional `:` separators and `0x` prefix.
pub fn parse_serial(s: &str) -> Option<Vec<u8>> {
    let hex: String = s
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.is_empty() || hex.len() > 42 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    let bytes = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(normalize_serial(&bytes))
}

/// Why a certificate that chains to the CA is refused anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Its identity is on the deny list.
    Identity,
    /// Its serial is on the deny list.
    Serial,
    /// Its serial is on a configured CRL.
    Crl,
}

impl Denied {
    /// The control-protocol code a live session closed for this reason carries.
    pub fn error_code(self) -> ztna_proto::ErrorCode {
        match self {
            Denied::Identity => ztna_proto::ErrorCode::IdentityDenied,
            Denied::Serial | Denied::Crl => ztna_proto::ErrorCode::Revoked,
        }
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Denied::Identity => "identity on the deny list",
            Denied::Serial => "certificate serial on the deny list",
            Denied::Crl => "certificate serial on a CRL",
        })
    }
}

/// A deny list and CRLs, as loaded from files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    /// Identities (certificate common names) refused whatever their certificate.
    pub identities: BTreeSet<String>,
    /// Certificate serial numbers refused (normalized as [`cert_serial`] returns them).
    pub serials: BTreeSet<Vec<u8>>,
    /// CRLs (DER) checked by webpki for the end-entity certificate.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

/// The deny-list file: `identities = ["mallory"]`, `serials = ["1f:2a:..."]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyFile {
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    serials: Vec<String>,
}

impl RevocationList {
    /// Parses a deny-list file's TOML text.
    pub fn parse_deny_list(text: &str) -> Result<Self, TlsError> {
        use figment::providers::{Format, Toml};
        let bad = |detail: String| TlsError::Pem {
            what: "deny list",
            detail,
        };
        let f: DenyFile = figment::Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| bad(e.to_string()))?;
        let mut out = Self::default();
        for i in f.identities {
            check_name("identity", &i).map_err(bad)?;
            out.identities.insert(i);
        }
        for s in f.serials {
            let serial = parse_serial(&s).ok_or_else(|| {
                bad(format!(
                    "serial \"{}\" is not hex (like 1f:2a:03)",
                    escape_for_log(&s)
                ))
            })?;
            out.serials.insert(serial);
        }
        Ok(out)
    }

    /// Loads the deny list (if any) and the CRL files (PEM or DER). A missing file is an error:
    /// a revocation that silently stopped applying would be worse than a failed reload.
    pub fn load(deny_list: Option<&Path>, crls: &[PathBuf]) -> Result<Self, TlsError> {
        let mut out = match deny_list {
            Some(p) => {
                let text = read(p)?;
                Self::parse_deny_list(&String::from_utf8_lossy(&text))?
            }
            None => Self::default(),
        };
        for p in crls {
            let bytes = read(p)?;
            let pem: Result<Vec<_>, _> =
                CertificateRevocationListDer::pem_slice_iter(&bytes).collect();
            match pem {
                Ok(list) if !list.is_empty() => out.crls.extend(list),
                _ => out.crls.push(CertificateRevocationListDer::from(bytes)),
            }
        }
        Ok(out)
    }
}

struct RevocationState {
    list: RevocationList,
    crl_serials: HashSet<Vec<u8>>,
    webpki: Arc<dyn ClientCertVerifier>,
}

/// The client-certificate policy of a server: CA, CRLs and deny list, replaceable while it
/// runs. Every server config built from one [`Credentials`] shares it, so an update applies to
/// the next handshake of each.
pub struct Revocation {
    roots: Arc<RootCertStore>,
    state: RwLock<Arc<RevocationState>>,
    /// Counts updates, for holders of live connections that must re-check them.
    updates: tokio::sync::watch::Sender<u64>,
}

impl fmt::Debug for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.current();
        f.debug_struct("Revocation")
            .field("identities", &st.list.identities.len())
            .field("serials", &st.list.serials.len())
            .field("crls", &st.list.crls.len())
            .finish()
    }
}

impl Revocation {
    fn new(roots: Arc<RootCertStore>) -> Result<Self, TlsError> {
        let state = Self::prepare(&roots, RevocationList::default())?;
        Ok(Self {
            roots,
            state: RwLock::new(Arc::new(state)),
            updates: tokio::sync::watch::Sender::new(0),
        })
    }

    fn prepare(
        roots: &Arc<RootCertStore>,
        list: RevocationList,
    ) -> Result<RevocationState, TlsError> {
        let mut builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
        if !list.crls.is_empty() {
            // Only the leaf is checked (the CA is the trust anchor), and a CRL from another
            // issuer does not lock everyone out.
            builder = builder
                .with_crls(list.crls.clone())
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        let webpki = builder
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(format!("CRLs: {e}"))))?;
        let mut crl_serials = HashSet::new();
        for crl in &list.crls {
            use x509_parser::prelude::*;
            let (_, parsed) =
                CertificateRevocationList::from_der(crl).map_err(|e| TlsError::Pem {
                    what: "CRL",
                    detail: e.to_string(),
                })?;
            for r in parsed.iter_revoked_certificates() {
                crl_serials.insert(normalize_serial(r.raw_serial()));
            }
        }
        Ok(RevocationState {
            list,
            crl_serials,
            webpki,
        })
    }

    fn current(&self) -> Arc<RevocationState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the deny list and CRLs, atomically: on error (an unparsable CRL) the old ones
    /// stay in force.
    pub fn update(&self, list: RevocationList) -> Result<(), TlsError> {
        let state = Arc::new(Self::prepare(&self.roots, list)?);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.updates.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Changes with every successful [`Revocation::update`]: a server re-checks its live
    /// connections with [`Revocation::denied_connection`] then.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.updates.subscribe()
    }

    /// Whether the peer of a live connection is refused now (its certificate's identity or
    /// serial); `None` also for a connection without a ztna certificate (the handshake checked
    /// it).
    pub fn denied_connection(&self, conn: &quinn::Connection) -> Option<Denied> {
        let name = PeerIdentity::from_connection(conn).ok()?.name;
        let serial = peer_serial(conn)?;
        self.denied(&name, &serial)
    }

    /// The lists in force.
    pub fn list(&self) -> RevocationList {
        self.current().list.clone()
    }

    /// Whether the holder of a certificate with this identity name and serial is refused now
    /// (for sessions that were admitted before an update).
    pub fn denied(&self, name: &str, serial: &[u8]) -> Option<Denied> {
        let st = self.current();
        if st.list.identities.contains(name) {
            Some(Denied::Identity)
        } else if st.list.serials.contains(serial) {
            Some(Denied::Serial)
        } else if st.crl_serials.contains(serial) {
            Some(Denied::Crl)
        } else {
            None
        }
    }
}

/// Verifies client certificates against [`Revocation`]: webpki (CA, validity, CRLs), then a
/// valid ztna identity, then the deny list.
#[derive(Debug)]
struct ClientVerifier {
    revocation: Arc<Revocation>,
    hints: Vec<DistinguishedName>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let st = self.revocation.current();
        st.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        // A certificate without a valid identity (bad characters in the name or a group) is
        // refused in the handshake: access_denied, and nothing of it is logged.
        let who = PeerIdentity::from_cert(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        let serial = cert_serial(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        drop(st);
        match self.revocation.denied(&who.name, &serial) {
            None => Ok(ClientCertVerified::assertion()),
            Some(Denied::Identity) => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            Some(Denied::Serial | Denied::Crl) => {
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.revocation
            .current()
            .webpki
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.revocation
            .current()
            .webpki
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.revocation.current().webpki.supported_verify_schemes()
    }
}

/// Loaded credentials: trust roots, own chain and key, own identity, and the client-certificate
/// policy of the servers built from them.
#[derive(Clone)]
pub struct Credentials {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    identity: PeerIdentity,
    revocation: Arc<Revocation>,
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
        let roots = Arc::new(roots);
        Ok(Self {
            revocation: Arc::new(Revocation::new(roots.clone())?),
            roots,
            chain,
            key: Arc::new(key),
            identity,
        })
    }

    /// The deny list and CRLs that servers built from these credentials apply (shared by every
    /// clone; update it to revoke without a restart).
    pub fn revocation(&self) -> &Arc<Revocation> {
        &self.revocation
    }

    /// The QUIC endpoint config of this node: its stateless-reset key and connection-ID key
    /// are derived from its private key, so a restarted process recognises its earlier
    /// connection IDs as its own and answers packets of connections it no longer has with a
    /// valid stateless reset: peers close those connections at once instead of waiting out the
    /// idle timeout (a restarted relay's clients reconnect; a restarted connector's agents open
    /// a new inner connection). quinn's defaults key both at random per process; with a random
    /// CID key, old CIDs fail validation and are dropped silently.
    pub fn endpoint_config(&self) -> quinn::EndpointConfig {
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&self.derive(b"connection id").as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        let mut cfg = quinn::EndpointConfig::new(Arc::new(self.reset_key()));
        cfg.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        cfg
    }

    /// As [`Credentials::endpoint_config`], for the relay: the same stateless-reset key, and
    /// connection IDs with 64 random bits ([`WideCidGenerator`]) instead of quinn's 24, so
    /// that a client's Initials after a Retry never collide with an established connection.
    pub fn relay_endpoint_config(&self) -> quinn::EndpointConfig {
        let generator = self.wide_cid_generator();
        let mut cfg = quinn::EndpointConfig::new(Arc::new(self.reset_key()));
        cfg.cid_generator(move || Box::new(generator.clone()));
        cfg
    }

    /// The connection-ID generator of [`Credentials::relay_endpoint_config`].
    pub fn wide_cid_generator(&self) -> WideCidGenerator {
        WideCidGenerator::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            self.derive(b"connection id, wide").as_ref(),
        ))
    }

    /// A key for `label`, derived from this node's private key (the same after a restart).
    fn derive(&self, label: &[u8]) -> ring::digest::Digest {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"ztna endpoint v1\0");
        ctx.update(label);
        ctx.update(b"\0");
        ctx.update(self.key.secret_der());
        ctx.finish()
    }

    fn reset_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            self.derive(b"stateless reset").as_ref(),
        )
    }

    /// This node's own identity, from its certificate.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// A quinn server crypto config that requires a client certificate issued by the CA, valid
    /// now, with a valid ztna identity, and not refused by [`Credentials::revocation`].
    pub fn server_config(&self, alpn: &[u8]) -> Result<Arc<QuicServerConfig>, TlsError> {
        let verifier = Arc::new(ClientVerifier {
            revocation: self.revocation.clone(),
            hints: self.roots.subjects(),
        });
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

/// Connection IDs of 16 bytes: 8 random, then the first 8 of an HMAC-SHA256 of those under a
/// key derived from the node's private key, so a restarted process still recognises (and
/// answers with a stateless reset) the IDs it handed out before.
///
/// Why not quinn's `HashedConnectionIdGenerator` ([`Credentials::endpoint_config`]): it draws
/// 3 random bytes, 16.7 million IDs. quinn never hands out an ID that is in use, except for a
/// Retry: the ID it puts in a Retry, which the client sends its next Initials to, is drawn
/// without that check, and quinn routes an Initial whose ID an established connection has to
/// that connection, which drops it. The client sends its Initial again, to the same ID, until
/// its handshake times out. A relay holding N connections (about 5 IDs each) that answers with
/// Retry, as it does while busy, lost about one handshake in 16.7 million / 5N that way: 69 of
/// 20,000 agents in the relay-scale benchmark, 1–7 of 5000. With 64 random bits the chance is
/// some 10⁻¹⁴ per Retry even with a million connections.
#[derive(Clone)]
pub struct WideCidGenerator {
    key: ring::hmac::Key,
    rng: ring::rand::SystemRandom,
}

impl WideCidGenerator {
    /// Random bytes at the front of an ID.
    const NONCE: usize = 8;
    /// MAC bytes after them.
    const TAG: usize = 8;

    /// A generator whose IDs `key` signs.
    pub fn new(key: ring::hmac::Key) -> Self {
        Self {
            key,
            rng: ring::rand::SystemRandom::new(),
        }
    }

    fn tag(&self, nonce: &[u8]) -> ring::hmac::Tag {
        ring::hmac::sign(&self.key, nonce)
    }
}

impl quinn_proto::ConnectionIdGenerator for WideCidGenerator {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        use ring::rand::SecureRandom;
        let mut id = [0u8; Self::NONCE + Self::TAG];
        if self.rng.fill(&mut id[..Self::NONCE]).is_err() {
            // The system's random source failed: nothing else on the machine would work either.
            panic!("no random bytes for a connection ID");
        }
        let tag = self.tag(&id[..Self::NONCE]);
        id[Self::NONCE..].copy_from_slice(&tag.as_ref()[..Self::TAG]);
        quinn_proto::ConnectionId::new(&id)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != Self::NONCE + Self::TAG {
            return Err(quinn_proto::InvalidCid);
        }
        let (nonce, tag) = cid.split_at(Self::NONCE);
        if self.tag(nonce).as_ref()[..Self::TAG] == *tag {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        Self::NONCE + Self::TAG
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
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

    /// The relay's connection IDs: its own validate, also after a restart (the same key), and
    /// others do not; and they do not repeat where quinn's 24 random bits would (200,000 IDs
    /// from `HashedConnectionIdGenerator` hold about 1200 pairs of equal ones).
    #[test]
    fn wide_connection_ids_validate_and_do_not_repeat() {
        use quinn_proto::ConnectionIdGenerator;
        let ca = pki::CertificateAuthority::generate("Test Org").unwrap();
        let creds = |name| {
            let relay = ca.issue(Role::Relay, name, &[], &[]).unwrap();
            Credentials::from_pem(
                ca.cert_pem().as_bytes(),
                relay.cert_pem.as_bytes(),
                relay.key_pem.as_bytes(),
            )
            .unwrap()
        };
        let relay = creds("relay");
        let mut gen = relay.wide_cid_generator();
        let restarted = relay.clone().wide_cid_generator();
        let other = creds("relay2").wide_cid_generator();
        assert_eq!(gen.cid_len(), 16);
        let mut seen = HashSet::new();
        for i in 0..200_000 {
            let cid = gen.generate_cid();
            assert_eq!(cid.len(), 16);
            assert!(seen.insert(cid), "connection ID repeated after {i}");
            if i < 100 {
                assert!(gen.validate(&cid).is_ok());
                assert!(restarted.validate(&cid).is_ok());
                assert!(other.validate(&cid).is_err());
                let mut bytes = cid.to_vec();
                bytes[i % 16] ^= 1;
                let altered = quinn_proto::ConnectionId::new(&bytes);
                assert!(gen.validate(&altered).is_err());
                assert!(gen
                    .validate(&quinn_proto::ConnectionId::new(&bytes[..8]))
                    .is_err());
            }
        }
    }

    #[test]
    fn serials_parse_and_print() {
        assert_eq!(parse_serial("0x1F:2a"), Some(vec![0x1f, 0x2a]));
        assert_eq!(parse_serial("00:ff"), Some(vec![0xff]));
        assert_eq!(parse_serial("abc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(parse_serial("zz"), None);
        assert_eq!(parse_serial(""), None);
        assert_eq!(parse_serial(&"1".repeat(60)), None);
        assert_eq!(format_serial(&[0x0a, 0xbc]), "0a:bc");
        assert_eq!(
            parse_serial(&format_serial(&[1, 2, 3])),
            Some(vec![1, 2, 3])
        );
    }

    #[test]
    fn deny_lists_parse_strictly() {
        let l = RevocationList::parse_deny_list(
            "identities = [\"mallory\"]\nserials = [\"0a:bc\", \"0xDEAD\"]\n",
        )
        .unwrap();
        assert!(l.identities.contains("mallory"));
        assert!(l.serials.contains(&vec![0x0a, 0xbc]) && l.serials.contains(&vec![0xde, 0xad]));
        assert_eq!(
            RevocationList::parse_deny_list("").unwrap(),
            RevocationList::default()
        );
        for bad in [
            "identities = [\"Bad Name\"]",
            "serials = [\"xyz\"]",
            "ids = []",
            "identities = [",
        ] {
            let e = RevocationList::parse_deny_list(bad)
                .unwrap_err()
                .to_string();
            assert!(!e.contains('\u{1b}'), "{e}");
        }
        assert!(RevocationList::load(Some(Path::new("/nonexistent/deny.toml")), &[]).is_err());
    }

    /// The verifier a server uses, straight: each refusal maps to its own TLS error (and so
    /// its own alert), and an update applies to the next verification.
    #[test]
    fn client_certificates_are_refused_for_each_reason() {
        use rustls::server::danger::ClientCertVerifier;
        let ca = pki::CertificateAuthority::generate("Org").unwrap();
        let relay = ca.issue(Role::Relay, "relay", &[], &[]).unwrap();
        let creds = Credentials::from_pem(
            ca.cert_pem().as_bytes(),
            relay.cert_pem.as_bytes(),
            relay.key_pem.as_bytes(),
        )
        .unwrap();
        let v = ClientVerifier {
            revocation: creds.revocation().clone(),
            hints: vec![],
        };
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let check = |cert: &CertificateDer<'_>| {
            v.verify_client_cert(cert, &[], UnixTime::now())
                .map(|_| ())
                .map_err(|e| match e {
                    rustls::Error::InvalidCertificate(c) => rustls::AlertDescription::from(c),
                    other => panic!("unexpected {other:?}"),
                })
        };
        let alice = ca
            .issue(Role::Agent, "alice", &["eng".into()], &[])
            .unwrap();
        let bob = ca.issue(Role::Agent, "bob", &[], &[]).unwrap();
        let carol = ca.issue(Role::Agent, "carol", &[], &[]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let old = ca
            .issue_with_validity(
                Role::Agent,
                "old",
                &[],
                &[],
                pki::Validity {
                    not_before: now - time::Duration::days(40),
                    not_after: now - time::Duration::days(10),
                },
            )
            .unwrap();
        let other = pki::CertificateAuthority::generate("Other").unwrap();
        let eve = other.issue(Role::Agent, "eve", &[], &[]).unwrap();
        assert_eq!(check(&der(&alice.cert_pem)), Ok(()));
        assert_eq!(
            check(&der(&old.cert_pem)),
            Err(rustls::AlertDescription::CertificateExpired)
        );
        assert_eq!(
            check(&der(&eve.cert_pem)),
            Err(rustls::AlertDescription::UnknownCA)
        );
        let crl = ca.crl(std::slice::from_ref(&carol.serial), 7).unwrap();
        let crl = CertificateRevocationListDer::from_pem_slice(crl.as_bytes()).unwrap();
        creds
            .revocation()
            .update(RevocationList {
                identities: ["bob".to_owned()].into(),
                serials: [alice.serial.clone()].into(),
                crls: vec![crl],
            })
            .unwrap();
        assert_eq!(
            check(&der(&alice.cert_pem)),
            Err(rustls::AlertDescription::CertificateRevoked)
        );
        assert_eq!(
            check(&der(&bob.cert_pem)),
            Err(rustls::AlertDescription::AccessDenied)
        );
        assert_eq!(
            check(&der(&carol.cert_pem)),
            Err(rustls::AlertDescription::CertificateRevoked)
        );
        let r = creds.revocation();
        assert_eq!(r.denied("bob", &bob.serial), Some(Denied::Identity));
        assert_eq!(r.denied("alice", &alice.serial), Some(Denied::Serial));
        assert_eq!(r.denied("carol", &carol.serial), Some(Denied::Crl));
        assert_eq!(r.denied("dave", &[1, 2]), None);
        // A broken CRL is refused and the lists in force stay.
        let broken = RevocationList {
            crls: vec![CertificateRevocationListDer::from(vec![
                0x30, 0x03, 1, 2, 3,
            ])],
            ..RevocationList::default()
        };
        assert!(creds.revocation().update(broken).is_err());
        assert_eq!(r.denied("bob", &bob.serial), Some(Denied::Identity));
        // Lifting the lists lets everyone with a valid certificate in again.
        creds
            .revocation()
            .update(RevocationList::default())
            .unwrap();
        assert_eq!(check(&der(&bob.cert_pem)), Ok(()));
        assert_eq!(check(&der(&carol.cert_pem)), Ok(()));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Credentials::from_pem(b"nope", b"nope", b"nope").is_err());
        assert!(PeerIdentity::from_cert(&[0x30, 0x03, 1, 2, 3]).is_err());
    }
}
