//! The organisation's certificate authority: minting the CA and issuing relay, connector and
//! agent certificates (rcgen). Used by `ztna-relay pki` and by tests.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use ztna_proto::control::Role;

use crate::tls::{GROUP_URI_PREFIX, ROLE_URI_PREFIX};

/// Validity of the CA certificate.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Default validity of issued certificates.
pub const LEAF_VALIDITY_DAYS: i64 = 397;

/// Why the PKI could not do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A name is not acceptable for the role.
    #[error("invalid name {0:?}: {1}")]
    Name(String, &'static str),
    /// Reading or writing a file failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// A certificate and its private key, PEM encoded.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key. Written with mode 0600; never logged.
    pub key_pem: String,
}

/// The organisation CA: its certificate and key.
pub struct CertificateAuthority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Whether `name` can be a DNS name in a certificate (for relays and connectors).
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl CertificateAuthority {
    /// Mints a new CA with a fresh key.
    pub fn generate(org: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, org);
        dn.push(DnType::CommonName, format!("{org} ztna CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // Re-signing the same parameters with the same key yields an issuer with the same
        // subject and key identifier, which is all that issuing needs.
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Loads `dir/ca.pem` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read_to_string(&p).map_err(|e| PkiError::Io(p.display().to_string(), e))
        };
        Self::from_pem(&read("ca.pem")?, &read("ca.key")?)
    }

    /// The CA certificate, PEM encoded.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA key, PEM encoded.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a certificate for `name` in `role`, with `groups` (agents) and extra IP SANs.
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        groups: &[String],
        ips: &[IpAddr],
    ) -> Result<Issued, PkiError> {
        if !ztna_proto::service::is_valid_name(name) {
            return Err(PkiError::Name(
                name.into(),
                "use letters, digits, '.', '-', '_' or '@'",
            ));
        }
        if role != Role::Agent && !is_dns_name(name) {
            return Err(PkiError::Name(
                name.into(),
                "relay and connector names must be DNS names",
            ));
        }
        if let Some(g) = groups
            .iter()
            .find(|g| !ztna_proto::service::is_valid_name(g))
        {
            return Err(PkiError::Name(g.clone(), "invalid group name"));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Agent => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Role::Relay => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Role::Connector => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        let mut sans = vec![SanType::URI(
            format!("{ROLE_URI_PREFIX}{}", role.as_str()).try_into()?,
        )];
        if role != Role::Agent {
            sans.push(SanType::DnsName(name.try_into()?));
        }
        for g in groups {
            sans.push(SanType::URI(format!("{GROUP_URI_PREFIX}{g}").try_into()?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        validity(&mut params, LEAF_VALIDITY_DAYS);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `contents` to `path`, with mode 0600 when `secret`. Refuses to overwrite.
pub fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e| PkiError::Io(path.display().to_string(), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_round_trips_through_pem_and_still_issues() {
        let ca = CertificateAuthority::generate("Org").unwrap();
        let again = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let leaf = again.issue(Role::Connector, "conn1", &[], &[]).unwrap();
        // A leaf from the reloaded CA verifies against the original CA certificate.
        let creds = crate::tls::Credentials::from_pem(
            ca.cert_pem().as_bytes(),
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .unwrap();
        assert_eq!(creds.identity().name, "conn1");
    }

    #[test]
    fn names_are_checked() {
        let ca = CertificateAuthority::generate("Org").unwrap();
        assert!(ca.issue(Role::Relay, "bad_name", &[], &[]).is_err());
        assert!(ca.issue(Role::Agent, "alice@example.org", &[], &[]).is_ok());
        assert!(ca.issue(Role::Agent, "a b", &[], &[]).is_err());
    }
}
