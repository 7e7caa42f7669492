//! Name-based services: DNS name patterns (`wiki.corp.example`, `*.corp.example`), and the one
//! message of the name stream, on which an agent tells a connector which real name one of its
//! virtual addresses stands for.
//!
//! A name service is a [`crate::ServiceDef`] with [`crate::service::NamePool`]: its address is
//! the first address of a pool of virtual addresses, and the agent hands out one address of
//! that pool per name it answers. The name stream is one bidirectional QUIC stream of the inner
//! connection per mapping: the agent writes [`encode_mapping`], the connector answers one byte
//! ([`MappingVerdict`]). Decoding is bounded ([`MAX_MAPPING_LEN`]) and never panics.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Longest DNS name, in its dotted form without the final dot.
pub const MAX_DNS_NAME_LEN: usize = 253;
/// Longest label.
const MAX_LABEL_LEN: usize = 63;

/// `name` lowercased and without a final dot, if it is a valid host name: labels of 1 to 63
/// ASCII letters, digits and hyphens (not first or last), at most [`MAX_DNS_NAME_LEN`] bytes,
/// at least one label. Names that fail are not names any service can have.
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_DNS_NAME_LEN {
        return None;
    }
    let ok = name.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_LABEL_LEN
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    });
    ok.then(|| name.to_ascii_lowercase())
}

/// A name a service answers to: one exact name, or `*.` and a domain (every name strictly
/// below that domain, at any depth; not the domain itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainPattern {
    wildcard: bool,
    /// The exact name, or the domain below which a wildcard matches; normalized.
    name: String,
}

impl DomainPattern {
    /// Parses `wiki.corp.example` or `*.corp.example` (case-insensitive, a final dot allowed).
    /// A wildcard's domain must have at least two labels, so `*.example` (a whole top-level
    /// domain) is refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = normalize_name(rest).ok_or_else(|| {
            format!(
                "invalid DNS name pattern \"{}\" (expected NAME or *.DOMAIN)",
                crate::service::escape_for_log(s)
            )
        })?;
        if wildcard && !name.contains('.') {
            return Err(format!(
                "wildcard \"*.{name}\" would cover a whole top-level domain"
            ));
        }
        Ok(Self { wildcard, name })
    }

    /// Whether `name` (already normalized with [`normalize_name`]) matches.
    pub fn matches(&self, name: &str) -> bool {
        if self.wildcard {
            name.len() > self.name.len() + 1
                && name.ends_with(self.name.as_str())
                && name.as_bytes()[name.len() - self.name.len() - 1] == b'.'
        } else {
            name == self.name
        }
    }

    /// Whether this is a wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The DNS domain that queries for this pattern belong to (the exact name, or the
    /// wildcard's domain): what split DNS routes to the agent.
    pub fn domain(&self) -> &str {
        &self.name
    }

    /// How specific the pattern is: exact names beat wildcards, longer domains beat shorter
    /// ones. When several services match a name, the most specific one serves it.
    pub fn specificity(&self) -> (bool, usize) {
        (!self.wildcard, self.name.split('.').count())
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// Whether `name` is at or below `domain` (both normalized).
pub fn in_domain(name: &str, domain: &str) -> bool {
    name == domain
        || (name.len() > domain.len()
            && name.ends_with(domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

/// Agent → connector: the virtual address `address` stands for the real name `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameMapping {
    /// A virtual address from the pool of one of the connector's name services.
    pub address: Ipv4Addr,
    /// The real DNS name, normalized.
    pub name: String,
}

/// Version byte in front of an encoded [`NameMapping`].
pub const NAME_STREAM_VERSION: u8 = 1;

/// Longest encoded mapping the connector reads (version, address, length, name).
pub const MAX_MAPPING_LEN: usize = 1 + 4 + 2 + MAX_DNS_NAME_LEN;

/// Why an encoded mapping was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    /// Empty, longer than [`MAX_MAPPING_LEN`], or not a mapping.
    #[error("malformed name mapping")]
    Malformed,
    /// Another version of the name stream.
    #[error("unsupported name stream version {0}")]
    UnsupportedVersion(u8),
    /// The name is not a valid, normalized DNS name.
    #[error("the mapping's name is not a valid DNS name")]
    InvalidName,
}

/// Encodes a mapping for the name stream.
pub fn encode_mapping(m: &NameMapping) -> Vec<u8> {
    // A struct of an address and a string always serializes (an empty result would be
    // refused as malformed).
    postcard::to_extend(m, vec![NAME_STREAM_VERSION]).unwrap_or_default()
}

/// Decodes what an agent wrote on a name stream. The name must already be normalized (so the
/// connector checks exactly the name it will resolve).
pub fn decode_mapping(bytes: &[u8]) -> Result<NameMapping, MappingError> {
    if bytes.len() > MAX_MAPPING_LEN {
        return Err(MappingError::Malformed);
    }
    let (&version, rest) = bytes.split_first().ok_or(MappingError::Malformed)?;
    if version != NAME_STREAM_VERSION {
        return Err(MappingError::UnsupportedVersion(version));
    }
    let (m, trailing) =
        postcard::take_from_bytes::<NameMapping>(rest).map_err(|_| MappingError::Malformed)?;
    if !trailing.is_empty() {
        return Err(MappingError::Malformed);
    }
    if normalize_name(&m.name).as_deref() != Some(m.name.as_str()) {
        return Err(MappingError::InvalidName);
    }
    Ok(m)
}

/// The connector's one-byte answer on a name stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MappingVerdict {
    /// Mapped: packets to the address now go to what the name resolves to.
    Accepted = 0,
    /// The message did not decode.
    Malformed = 1,
    /// No service of this connector that policy lets the agent reach answers to that name, or
    /// the address is not in that service's pool.
    Refused = 2,
    /// The agent has as many mappings as the connector keeps per agent.
    Full = 3,
}

impl MappingVerdict {
    /// The byte on the wire.
    pub fn to_byte(self) -> u8 {
        self as u8
    }

    /// The verdict a byte stands for.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Accepted,
            1 => Self::Malformed,
            2 => Self::Refused,
            3 => Self::Full,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize() {
        assert_eq!(
            normalize_name("Wiki.Corp.Example.").as_deref(),
            Some("wiki.corp.example")
        );
        assert_eq!(normalize_name("a").as_deref(), Some("a"));
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "a_b.c",
            "caf\u{e9}.fr",
            "a.b\n",
        ] {
            assert_eq!(normalize_name(bad), None, "{bad:?}");
        }
        assert!(normalize_name(&"a".repeat(64)).is_none());
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(normalize_name(&long).is_none()); // 255 bytes
    }

    #[test]
    fn patterns_match() {
        let exact = DomainPattern::parse("Wiki.corp.example").unwrap();
        let wild = DomainPattern::parse("*.corp.example").unwrap();
        assert!(exact.matches("wiki.corp.example"));
        assert!(!exact.matches("x.wiki.corp.example"));
        assert!(wild.matches("wiki.corp.example"));
        assert!(wild.matches("a.b.corp.example"));
        assert!(!wild.matches("corp.example"));
        assert!(!wild.matches("evilcorp.example"));
        assert!(!wild.matches("corp.example.evil"));
        assert_eq!(wild.domain(), "corp.example");
        assert_eq!(wild.to_string(), "*.corp.example");
        assert!(exact.specificity() > wild.specificity());
        assert!(
            DomainPattern::parse("*.a.corp.example")
                .unwrap()
                .specificity()
                > wild.specificity()
        );
        assert!(DomainPattern::parse("*.example").is_err());
        assert!(DomainPattern::parse("*").is_err());
        assert!(DomainPattern::parse("a.*.example").is_err());
        assert!(DomainPattern::parse("**.example.org").is_err());
    }

    #[test]
    fn domains() {
        assert!(in_domain("corp.example", "corp.example"));
        assert!(in_domain("a.corp.example", "corp.example"));
        assert!(!in_domain("acorp.example", "corp.example"));
        assert!(!in_domain("example", "corp.example"));
    }

    #[test]
    fn mappings_round_trip_and_refuse_garbage() {
        let m = NameMapping {
            address: Ipv4Addr::new(10, 101, 0, 7),
            name: "wiki.corp.example".into(),
        };
        let bytes = encode_mapping(&m);
        assert!(bytes.len() <= MAX_MAPPING_LEN);
        assert_eq!(decode_mapping(&bytes), Ok(m.clone()));
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(
            decode_mapping(&v2),
            Err(MappingError::UnsupportedVersion(2))
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode_mapping(&trailing), Err(MappingError::Malformed));
        assert_eq!(decode_mapping(&[]), Err(MappingError::Malformed));
        let upper = encode_mapping(&NameMapping {
            name: "WIKI.corp.example".into(),
            ..m.clone()
        });
        assert_eq!(decode_mapping(&upper), Err(MappingError::InvalidName));
        let evil = encode_mapping(&NameMapping {
            name: "wiki\n.corp".into(),
            ..m
        });
        assert_eq!(decode_mapping(&evil), Err(MappingError::InvalidName));
        let longest = NameMapping {
            address: Ipv4Addr::BROADCAST,
            name: [
                "a".repeat(63),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(61),
            ]
            .join("."),
        };
        assert_eq!(decode_mapping(&encode_mapping(&longest)), Ok(longest));
        for b in 0..=255u8 {
            let v = MappingVerdict::from_byte(b);
            assert!(v.is_none_or(|v| v.to_byte() == b));
        }
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode_mapping(&bytes);
        }

        #[test]
        fn wildcards_match_only_below_their_domain(label in "[a-z0-9]{1,10}", other in "[a-z0-9.]{0,30}") {
            let p = DomainPattern::parse("*.corp.example").unwrap();
            let below = format!("{label}.corp.example");
            proptest::prop_assert!(p.matches(&below));
            if let Some(n) = normalize_name(&other) {
                proptest::prop_assert_eq!(p.matches(&n), n.ends_with(".corp.example"));
            }
        }
    }
}
