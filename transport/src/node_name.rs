//! How a node's name is written into, and read back out of, its certificate.
//!
//! A node certificate names its node in one subject-alternative-name DNS entry,
//! `<node>.node.trireme`. That entry is what the verifiers check: the client side
//! through webpki's server-name check (which only looks at SAN entries, never at the
//! CN), the server side by reading it back from the client certificate here. The CN
//! also carries the bare node name, for people reading the certificate with
//! `openssl x509 -text`; no code trusts it.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// DNS suffix under which node names appear in certificates.
pub const NODE_DNS_SUFFIX: &str = ".node.trireme";

/// Longest node name: one DNS label.
pub const MAX_NODE_NAME_LEN: usize = 63;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum NodeNameError {
    /// Checking a node name: it must be a DNS label (`[a-z0-9-]`, 1 to 63 characters,
    /// no leading or trailing `-`) so that `<node>.node.trireme` is a valid DNS name.
    #[error("invalid node name {name:?}: {reason}")]
    Invalid {
        /// The rejected name (truncated to a printable length).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Parsing a peer certificate.
    #[error("parsing certificate: {0}")]
    ParseCertificate(String),
    /// Reading the node name out of a certificate: no SAN entry `<node>.node.trireme`.
    #[error("certificate names no node (no SAN DNS entry under {NODE_DNS_SUFFIX})")]
    NoNodeName,
    /// Reading the node name out of a certificate: more than one node named.
    #[error("certificate names more than one node")]
    SeveralNodeNames,
}

/// Check that `name` is a valid node name.
pub fn validate(name: &str) -> Result<(), NodeNameError> {
    let invalid = |reason| NodeNameError::Invalid {
        name: name.chars().take(80).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return Err(invalid("longer than 63 bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid("only a-z, 0-9 and '-' are allowed"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(invalid("starts or ends with '-'"));
    }
    Ok(())
}

/// The DNS name under which node `name` appears in certificates.
pub fn dns_name(name: &str) -> Result<String, NodeNameError> {
    validate(name)?;
    Ok(format!("{name}{NODE_DNS_SUFFIX}"))
}

/// The node named by a DER certificate: its one SAN DNS entry `<node>.node.trireme`.
/// Only meaningful for a certificate whose chain to the cluster CA was verified.
pub fn from_certificate(der: &[u8]) -> Result<String, NodeNameError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| NodeNameError::ParseCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| NodeNameError::ParseCertificate(e.to_string()))?
        .ok_or(NodeNameError::NoNodeName)?;
    let mut found: Option<&str> = None;
    for general_name in &san.value.general_names {
        let GeneralName::DNSName(dns) = general_name else {
            continue;
        };
        let Some(node) = dns.strip_suffix(NODE_DNS_SUFFIX) else {
            continue;
        };
        if found.is_some() {
            return Err(NodeNameError::SeveralNodeNames);
        }
        found = Some(node);
    }
    let node = found.ok_or(NodeNameError::NoNodeName)?;
    validate(node)?;
    Ok(node.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_labels() {
        for good in ["a", "node-1", "dc1-n07", &"x".repeat(63)] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(64),
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
        assert_eq!(dns_name("n1").ok().as_deref(), Some("n1.node.trireme"));
    }
}
