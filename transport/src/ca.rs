//! The cluster certificate authority and the node identities it issues.
//!
//! `trireme cluster init` creates one [`ClusterCa`] per cluster; a command per node
//! issues that node's [`NodeIdentity`]. Every node holds the CA *certificate*
//! ([`CaCertificate`], public) as its only trust anchor and never the CA key, which
//! stays with the operator's admin host.
//!
//! A node certificate names its node in a SAN DNS entry `<node>.node.trireme` (see
//! [`crate::node_name`]), carries both the client- and server-auth EKUs (every node
//! both dials and listens), and is signed directly by the CA (path length 0: no
//! intermediates exist).
//!
//! Everything here is in memory and PEM. Writing the files is the caller's job, crash
//! safely and with mode 0600 for keys (`engine::crashsafe::write_file(path, pem, 0o600)`).

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::node_name::{self, NodeNameError};

/// How long the CA certificate is valid. Long: rotating a cluster CA means reissuing
/// every node certificate, which no command does yet.
pub const CA_VALIDITY: Duration = Duration::days(30 * 365);

/// How long a node certificate is valid. Reissue with [`ClusterCa::issue_node`] and
/// restart the node before then.
pub const NODE_CERT_VALIDITY: Duration = Duration::days(5 * 365);

/// Slack before "now" on `notBefore`, for clocks of the cluster that run a bit late.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Generating a key pair.
    #[error("generating a key pair")]
    GenerateKey(#[source] rcgen::Error),
    /// Signing a certificate.
    #[error("signing the certificate of {subject}")]
    Sign {
        /// Whose certificate.
        subject: String,
        /// Why rcgen failed.
        #[source]
        source: rcgen::Error,
    },
    /// Drawing random bytes (cluster id, serial numbers).
    #[error("drawing random bytes")]
    Random(#[source] getrandom::Error),
    /// Parsing a PEM input.
    #[error("parsing the {what} PEM")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why it does not parse.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// Parsing a private key.
    #[error("parsing the {what} private key")]
    Key {
        /// Which key.
        what: &'static str,
        /// Why it does not parse.
        #[source]
        source: rcgen::Error,
    },
    /// Parsing a certificate.
    #[error("parsing the {what} certificate: {reason}")]
    Certificate {
        /// Which certificate.
        what: &'static str,
        /// Why it does not parse.
        reason: String,
    },
    /// Loading the CA: the certificate is not a CA certificate.
    #[error("the CA certificate is not marked as a CA")]
    NotCa,
    /// Loading a certificate with its key: the key is not the certificate's.
    #[error("the {what} private key does not belong to its certificate")]
    KeyMismatch {
        /// Which pair.
        what: &'static str,
    },
    /// Checking a node name.
    #[error(transparent)]
    NodeName(#[from] NodeNameError),
}

/// The cluster CA certificate alone: the trust anchor every node verifies its peers
/// against.
#[derive(Clone, Debug)]
pub struct CaCertificate {
    der: CertificateDer<'static>,
}

impl CaCertificate {
    /// Parse the CA certificate from PEM (the first certificate in `pem`).
    pub fn from_pem(pem: &[u8]) -> Result<Self, CaError> {
        let der = CertificateDer::from_pem_slice(pem).map_err(|source| CaError::Pem {
            what: "CA certificate",
            source,
        })?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| CaError::Certificate {
            what: "CA",
            reason: e.to_string(),
        })?;
        if !cert.is_ca() {
            return Err(CaError::NotCa);
        }
        Ok(Self { der })
    }

    /// The certificate in PEM.
    pub fn to_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }

    /// The certificate in DER.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }
}

/// The cluster CA: its certificate and its signing key.
pub struct ClusterCa {
    certificate: CaCertificate,
    /// A certificate with the CA's subject, key identifier and key, rebuilt from the
    /// original: rcgen signs with it (it takes the issuer's name and key identifier
    /// from it; the rebuilt copy is never published).
    signer: rcgen::Certificate,
    key: KeyPair,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Create a new cluster CA (ECDSA P-256) with a random cluster id in its name, so
    /// that the CAs of two clusters never share a subject.
    pub fn create() -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::GenerateKey)?;
        let cluster_id = hex(&random_bytes::<8>()?);
        let subject = format!("Trireme cluster CA {cluster_id}");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Trireme");
        params
            .distinguished_name
            .push(DnType::CommonName, subject.clone());
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&random_bytes::<16>()?));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + CA_VALIDITY;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CaError::Sign { subject, source })?;
        let certificate = CaCertificate {
            der: cert.der().clone(),
        };
        Ok(Self {
            certificate,
            signer: cert,
            key,
        })
    }

    /// Load a CA written by [`Self::cert_pem`] and [`Self::key_pem`].
    pub fn load(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, CaError> {
        let certificate = CaCertificate::from_pem(cert_pem)?;
        let key_pem = std::str::from_utf8(key_pem).map_err(|_| CaError::Certificate {
            what: "CA key",
            reason: "not UTF-8".to_owned(),
        })?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|source| CaError::Key { what: "CA", source })?;
        check_key_matches(&certificate.der, &key, "CA")?;
        let params = CertificateParams::from_ca_cert_der(&certificate.der).map_err(|e| {
            CaError::Certificate {
                what: "CA",
                reason: e.to_string(),
            }
        })?;
        let signer = params.self_signed(&key).map_err(|source| CaError::Sign {
            subject: "the CA (signing handle)".to_owned(),
            source,
        })?;
        Ok(Self {
            certificate,
            signer,
            key,
        })
    }

    /// The CA certificate, to hand to every node.
    pub fn certificate(&self) -> &CaCertificate {
        &self.certificate
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.certificate.to_pem()
    }

    /// The CA private key in PEM (PKCS#8). Store it with mode 0600, off the nodes.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// Issue a certificate and a fresh key for node `node`.
    pub fn issue_node(&self, node: &str) -> Result<NodeIdentity, CaError> {
        let dns = node_name::dns_name(node)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::GenerateKey)?;
        let sign_err = |source| CaError::Sign {
            subject: format!("node {node}"),
            source,
        };
        let mut params = CertificateParams::new(vec![dns]).map_err(sign_err)?;
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Trireme");
        params.distinguished_name.push(DnType::CommonName, node);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&random_bytes::<16>()?));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + NODE_CERT_VALIDITY;
        let cert = params
            .signed_by(&key, &self.signer, &self.key)
            .map_err(sign_err)?;
        Ok(NodeIdentity {
            node: node.to_owned(),
            cert: cert.der().clone(),
            key_der: Zeroizing::new(key.serialize_der()),
        })
    }
}

/// A node's certificate and private key.
#[derive(Clone)]
pub struct NodeIdentity {
    node: String,
    cert: CertificateDer<'static>,
    /// PKCS#8 DER.
    key_der: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Load an identity from its PEM files. The node name is read from the
    /// certificate; whether the certificate chains to the cluster CA is checked when an
    /// endpoint is bound with it.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, CaError> {
        let cert = CertificateDer::from_pem_slice(cert_pem).map_err(|source| CaError::Pem {
            what: "node certificate",
            source,
        })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| CaError::Pem {
            what: "node key",
            source,
        })?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(CaError::Certificate {
                what: "node key",
                reason: "not a PKCS#8 key".to_owned(),
            });
        };
        let key_der = Zeroizing::new(pkcs8.secret_pkcs8_der().to_vec());
        let pair = KeyPair::try_from(key_der.as_slice()).map_err(|source| CaError::Key {
            what: "node",
            source,
        })?;
        check_key_matches(&cert, &pair, "node")?;
        let node = node_name::from_certificate(&cert)?;
        Ok(Self {
            node,
            cert,
            key_der,
        })
    }

    /// The node this identity names.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The certificate in PEM.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert)
    }

    /// The private key in PEM (PKCS#8). Store it with mode 0600.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem_encode("PRIVATE KEY", &self.key_der))
    }

    /// The certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key, for rustls.
    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.to_vec().into())
    }
}

fn check_key_matches(cert: &[u8], key: &KeyPair, what: &'static str) -> Result<(), CaError> {
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| CaError::Certificate {
        what,
        reason: e.to_string(),
    })?;
    if parsed.public_key().raw != key.public_key_der().as_slice() {
        return Err(CaError::KeyMismatch { what });
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N], CaError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(CaError::Random)?;
    // A positive serial number: DER integers are signed.
    if let Some(first) = bytes.first_mut() {
        *first &= 0x7f;
    }
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// PEM with LF line endings, as OpenSSL writes it.
fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
