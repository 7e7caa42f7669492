//! Access policy, pure: which agents may reach which services, and which connectors may serve
//! which services.

use serde::{Deserialize, Serialize};

use ztna_core::tls::PeerIdentity;

/// Grants the agents matching `groups` or `identities` access to `services` (`"*"`: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Service names, or `"*"`.
    pub services: Vec<String>,
    /// Agent certificate groups this rule applies to.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Agent identities this rule applies to.
    #[serde(default)]
    pub identities: Vec<String>,
}

/// Lets connector `identity` serve `services` (`"*"`: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorRule {
    /// The connector's certificate identity.
    pub identity: String,
    /// Service names, or `"*"`.
    pub services: Vec<String>,
}

/// The whole policy. Nothing is allowed unless a rule allows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Agent access rules.
    pub access: Vec<AccessRule>,
    /// Connector rules.
    pub connectors: Vec<ConnectorRule>,
}

fn names(list: &[String], name: &str) -> bool {
    list.iter().any(|s| s == "*" || s == name)
}

impl Policy {
    /// Whether `agent` may reach the service called `service`.
    pub fn agent_may_reach(&self, agent: &PeerIdentity, service: &str) -> bool {
        self.access.iter().any(|r| {
            names(&r.services, service)
                && (r.identities.iter().any(|i| i == &agent.name)
                    || r.groups.iter().any(|g| agent.groups.contains(g)))
        })
    }

    /// Whether connector `connector` may serve the service called `service`.
    pub fn connector_may_serve(&self, connector: &str, service: &str) -> bool {
        self.connectors
            .iter()
            .any(|r| r.identity == connector && names(&r.services, service))
    }
}

#[cfg(test)]
mod tests {
    use ztna_proto::Role;

    use super::*;

    fn agent(name: &str, groups: &[&str]) -> PeerIdentity {
        PeerIdentity {
            name: name.into(),
            role: Role::Agent,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn rules() {
        let p = Policy {
            access: vec![
                AccessRule {
                    services: vec!["echo".into(), "dns".into()],
                    groups: vec!["eng".into()],
                    identities: vec![],
                },
                AccessRule {
                    services: vec!["*".into()],
                    groups: vec![],
                    identities: vec!["root".into()],
                },
            ],
            connectors: vec![ConnectorRule {
                identity: "c1".into(),
                services: vec!["echo".into()],
            }],
        };
        assert!(p.agent_may_reach(&agent("alice", &["eng"]), "echo"));
        assert!(!p.agent_may_reach(&agent("alice", &["eng"]), "secret"));
        assert!(!p.agent_may_reach(&agent("bob", &["ops"]), "echo"));
        assert!(p.agent_may_reach(&agent("root", &[]), "secret"));
        assert!(p.connector_may_serve("c1", "echo"));
        assert!(!p.connector_may_serve("c1", "dns"));
        assert!(!p.connector_may_serve("c2", "echo"));
        assert!(!Policy::default().agent_may_reach(&agent("x", &["eng"]), "echo"));
    }
}
