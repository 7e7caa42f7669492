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
/// Default validity of relay and connector certificates.
pub const LEAF_VALIDITY_DAYS: i64 = 397;
/// Default validity of agent certificates: short, so a lost device's certificate expires on its
/// own within a month even if nobody revokes it.
pub const AGENT_VALIDITY_DAYS: i64 = 30;
/// Longest validity `issue` accepts.
pub const MAX_VALIDITY_DAYS: i64 = CA_VALIDITY_DAYS;

/// The default validity of a certificate for `role`, in days.
pub fn default_validity_days(role: Role) -> i64 {
    match role {
        Role::Agent => AGENT_VALIDITY_DAYS,
        Role::Relay | Role::Connector => LEAF_VALIDITY_DAYS,
    }
}

/// When an issued certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before.
    pub not_before: time::OffsetDateTime,
    /// Not valid after.
    pub not_after: time::OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) to `days` from now.
    pub fn days(days: i64) -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self {
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(days),
        }
    }
}

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
    /// A validity period outside 1..=MAX_VALIDITY_DAYS days.
    #[error("validity of {0} days: use 1 to {MAX_VALIDITY_DAYS}")]
    Days(i64),
}

/// A certificate and its private key, PEM encoded.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key. Written with mode 0600; never logged.
    pub key_pem: String,
    /// The serial number (as `tls::cert_serial` reads it back), for deny lists and CRLs.
    pub serial: Vec<u8>,
    /// End of validity.
    pub not_after: time::OffsetDateTime,
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

    /// Issues a certificate for `name` in `role`, with `groups` (agents) and extra IP SANs,
    /// valid for the role's default ([`default_validity_days`]).
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        groups: &[String],
        ips: &[IpAddr],
    ) -> Result<Issued, PkiError> {
        self.issue_for_days(role, name, groups, ips, default_validity_days(role))
    }

    /// Like [`CertificateAuthority::issue`], valid for `days` (1 to [`MAX_VALIDITY_DAYS`]).
    pub fn issue_for_days(
        &self,
        role: Role,
        name: &str,
        groups: &[String],
        ips: &[IpAddr],
        days: i64,
    ) -> Result<Issued, PkiError> {
        if !(1..=MAX_VALIDITY_DAYS).contains(&days) {
            return Err(PkiError::Days(days));
        }
        self.issue_with_validity(role, name, groups, ips, Validity::days(days))
    }

    /// Like [`CertificateAuthority::issue`], with an explicit validity window (tests use it to
    /// mint expired certificates).
    pub fn issue_with_validity(
        &self,
        role: Role,
        name: &str,
        groups: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        if !ztna_proto::service::is_valid_name(name) {
            return Err(PkiError::Name(
                name.into(),
                "use lowercase letters, digits, '.', '-', '_' or '@', starting with a letter or digit",
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
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let serial = crate::tls::cert_serial(cert.der())
            .map_err(|_| PkiError::Name(name.into(), "issued certificate does not parse"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
            not_after: validity.not_after,
        })
    }

    /// A CRL signed by the CA that revokes `serials`, valid for `days` (PEM). Its number is the
    /// current Unix time, so a later CRL supersedes an earlier one.
    pub fn crl(&self, serials: &[Vec<u8>], days: i64) -> Result<String, PkiError> {
        use rcgen::{
            CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber,
        };
        if !(1..=MAX_VALIDITY_DAYS).contains(&days) {
            return Err(PkiError::Days(days));
        }
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + time::Duration::days(days),
            crl_number: SerialNumber::from(now.unix_timestamp().max(1) as u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - time::Duration::minutes(5),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.cert, &self.key)?.pem()?)
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
    fn lifetimes_and_serials() {
        let ca = CertificateAuthority::generate("Org").unwrap();
        let agent = ca.issue(Role::Agent, "alice", &[], &[]).unwrap();
        let conn = ca.issue(Role::Connector, "conn1", &[], &[]).unwrap();
        let days = |i: &Issued| (i.not_after - time::OffsetDateTime::now_utc()).whole_days();
        assert!((29..=30).contains(&days(&agent)), "{}", days(&agent));
        assert!((396..=397).contains(&days(&conn)));
        let short = ca.issue_for_days(Role::Agent, "bob", &[], &[], 1).unwrap();
        assert!(days(&short) <= 1);
        assert!(ca.issue_for_days(Role::Agent, "bob", &[], &[], 0).is_err());
        assert!(ca
            .issue_for_days(Role::Agent, "bob", &[], &[], MAX_VALIDITY_DAYS + 1)
            .is_err());
        // The serial reads back from the certificate, and differs per certificate.
        let der = rustls::pki_types::CertificateDer::from(
            x509_parser::pem::parse_x509_pem(agent.cert_pem.as_bytes())
                .unwrap()
                .1
                .contents,
        );
        assert_eq!(crate::tls::cert_serial(&der).unwrap(), agent.serial);
        assert_ne!(agent.serial, conn.serial);
        assert!(ca
            .crl(std::slice::from_ref(&agent.serial), 7)
            .unwrap()
            .contains("X509 CRL"));
    }

    #[test]
    fn names_are_checked() {
        let ca = CertificateAuthority::generate("Org").unwrap();
        assert!(ca.issue(Role::Relay, "bad_name", &[], &[]).is_err());
        assert!(ca.issue(Role::Agent, "alice@example.org", &[], &[]).is_ok());
        assert!(ca.issue(Role::Agent, "a b", &[], &[]).is_err());
    }
}
