//! The cluster CA: create, write to PEM and load back, issue node certificates that
//! carry the node name and both EKUs, and refuse mismatched or malformed inputs.

use trireme_transport::{CaError, ClusterCa, NodeIdentity};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[test]
fn ca_round_trips_through_pem_and_issues_node_certificates() {
    let ca = ClusterCa::create().expect("create CA");
    let cert_pem = ca.cert_pem();
    let key_pem = ca.key_pem();
    assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));

    let loaded = ClusterCa::load(cert_pem.as_bytes(), key_pem.as_bytes()).expect("load CA");
    assert_eq!(
        loaded.cert_pem(),
        cert_pem,
        "the loaded CA publishes the same certificate"
    );

    let node = loaded.issue_node("dc2-n1").expect("issue");
    assert_eq!(node.node(), "dc2-n1");
    let reloaded = NodeIdentity::from_pem(node.cert_pem().as_bytes(), node.key_pem().as_bytes())
        .expect("load node identity");
    assert_eq!(reloaded.node(), "dc2-n1");
    assert_eq!(reloaded.cert_der(), node.cert_der());

    let (_, cert) = X509Certificate::from_der(node.cert_der()).expect("parse node cert");
    let (_, ca_cert) = X509Certificate::from_der(ca.certificate().der()).expect("parse CA cert");
    assert_eq!(
        cert.issuer(),
        ca_cert.subject(),
        "issuer is the CA subject, byte for byte"
    );
    assert!(!cert.is_ca());
    let san = cert
        .subject_alternative_name()
        .expect("SAN")
        .expect("SAN present");
    let dns: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert_eq!(dns, ["dc2-n1.node.trireme"]);
    let eku = cert
        .extended_key_usage()
        .expect("EKU")
        .expect("EKU present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(
        cert.verify_signature(Some(ca_cert.public_key())).is_ok(),
        "signed by the CA key"
    );
}

#[test]
fn two_clusters_have_distinct_ca_subjects() {
    let a = ClusterCa::create().expect("create CA");
    let b = ClusterCa::create().expect("create CA");
    let (_, a) = X509Certificate::from_der(a.certificate().der()).expect("parse");
    let (_, b) = X509Certificate::from_der(b.certificate().der()).expect("parse");
    assert_ne!(a.subject(), b.subject());
}

#[test]
fn mismatched_or_malformed_inputs_are_refused() {
    let ca = ClusterCa::create().expect("create CA");
    let other = ClusterCa::create().expect("create CA");
    assert!(matches!(
        ClusterCa::load(ca.cert_pem().as_bytes(), other.key_pem().as_bytes()),
        Err(CaError::KeyMismatch { .. })
    ));
    let node = ca.issue_node("n1").expect("issue");
    // A node certificate is not a CA.
    assert!(matches!(
        ClusterCa::load(node.cert_pem().as_bytes(), node.key_pem().as_bytes()),
        Err(CaError::NotCa)
    ));
    let node2 = ca.issue_node("n2").expect("issue");
    assert!(matches!(
        NodeIdentity::from_pem(node.cert_pem().as_bytes(), node2.key_pem().as_bytes()),
        Err(CaError::KeyMismatch { .. })
    ));
    assert!(ClusterCa::load(b"garbage", b"garbage").is_err());
    assert!(NodeIdentity::from_pem(b"", b"").is_err());
    for bad in ["", "Upper", "a.b", "-x", "x-", &"n".repeat(64)] {
        assert!(
            matches!(ca.issue_node(bad), Err(CaError::NodeName(_))),
            "{bad:?}"
        );
    }
}
