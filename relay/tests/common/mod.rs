//! What the relay's integration tests share.

use std::path::Path;

use ztna_core::pki::{self, CertificateAuthority};
use ztna_core::tls::TlsFiles;
use ztna_proto::control::Role;

/// A new organisation CA ("Test"), its certificate written to `dir/ca.pem`.
pub(crate) fn new_ca(dir: &Path) -> CertificateAuthority {
    let ca = CertificateAuthority::generate("Test").unwrap();
    pki::write_new(&dir.join("ca.pem"), &ca.cert_pem(), false).unwrap();
    ca
}

/// Issues `name` a certificate of `role` in `groups` from `ca` and writes it and its key into
/// `dir` (beside `ca.pem`); a certificate already there is reused.
pub(crate) fn issue(
    ca: &CertificateAuthority,
    dir: &Path,
    role: Role,
    name: &str,
    groups: &[&str],
) -> TlsFiles {
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    if files.cert.exists() {
        return files;
    }
    let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    let i = ca.issue(role, name, &groups, &[]).unwrap();
    pki::write_new(&files.cert, &i.cert_pem, false).unwrap();
    pki::write_new(&files.key, &i.key_pem, true).unwrap();
    files
}
