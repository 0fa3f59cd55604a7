//! The TLS side of an endpoint: rustls configurations (ring provider, TLS 1.3 only, no
//! session resumption) whose verifiers accept exactly the certificates issued by the
//! cluster CA to a registered node.
//!
//! - Server side: a client certificate is mandatory; it must chain to the cluster CA
//!   (with the client-auth EKU) and name a registered node. Otherwise the handshake
//!   fails, so the connection never reaches the accept queue and no stream of it is
//!   ever read.
//! - Client side: the server certificate must chain to the cluster CA (server-auth EKU),
//!   carry the SAN `<node>.node.trireme` of the node we dialled, and that node must be
//!   registered.
//!
//! Resumption is off on both sides: with it, a resumed session would skip the
//! verifiers and reuse an identity checked against an older registry.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::ca::{CaCertificate, NodeIdentity};
use crate::node_name::{self, NodeNameError};
use crate::registry::NodeRegistry;

/// ALPN protocol id of the node-to-node protocol.
pub(crate) const ALPN: &[u8] = b"trireme/1";

/// A verified peer that is not in the registry.
#[derive(Debug, thiserror::Error)]
#[error("node {0} is not registered in this cluster")]
struct NotRegistered(String);

/// The ring provider, the only one this crate uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CaCertificate) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone())?;
    Ok(Arc::new(roots))
}

fn verifier_error(e: rustls::server::VerifierBuilderError) -> Error {
    Error::General(format!("building certificate verifier: {e}"))
}

fn application_failure(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The node named by a certificate that already chained to the CA, if registered.
fn registered_node(
    end_entity: &CertificateDer<'_>,
    registry: &dyn NodeRegistry,
) -> Result<String, Error> {
    let node = node_name::from_certificate(end_entity).map_err(application_failure)?;
    if !registry.is_registered(&node) {
        return Err(application_failure(NotRegistered(node)));
    }
    Ok(node)
}

/// The node named by the certificate of an established connection's peer.
pub(crate) fn peer_node(conn: &quinn::Connection) -> Result<String, NodeNameError> {
    let identity = conn.peer_identity().ok_or(NodeNameError::NoNodeName)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| NodeNameError::NoNodeName)?;
    let end_entity = certs.first().ok_or(NodeNameError::NoNodeName)?;
    node_name::from_certificate(end_entity)
}

struct RegisteredClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    registry: Arc<dyn NodeRegistry>,
}

impl fmt::Debug for RegisteredClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisteredClientVerifier")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for RegisteredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        registered_node(end_entity, self.registry.as_ref())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

struct RegisteredServerVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    registry: Arc<dyn NodeRegistry>,
}

impl fmt::Debug for RegisteredServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisteredServerVerifier")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for RegisteredServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // Chain to the cluster CA, server-auth EKU, and a SAN equal to the
        // `<node>.node.trireme` we dialled.
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        registered_node(end_entity, self.registry.as_ref())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Check that `identity` is a certificate of this cluster usable both ways, so that a
/// misconfigured node fails at start rather than at its first connection.
pub(crate) fn check_identity(identity: &NodeIdentity, ca: &CaCertificate) -> Result<(), Error> {
    let roots = roots(ca)?;
    let now = UnixTime::now();
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(verifier_error)?
        .verify_client_cert(identity.cert_der(), &[], now)?;
    let name = node_name::dns_name(identity.node()).map_err(application_failure)?;
    let server_name = ServerName::try_from(name).map_err(application_failure)?;
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(verifier_error)?
        .verify_server_cert(identity.cert_der(), &[], &server_name, &[], now)?;
    Ok(())
}

/// The rustls server configuration of an endpoint.
pub(crate) fn server_config(
    identity: &NodeIdentity,
    ca: &CaCertificate,
    registry: Arc<dyn NodeRegistry>,
) -> Result<rustls::ServerConfig, Error> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(verifier_error)?;
    let verifier = Arc::new(RegisteredClientVerifier { inner, registry });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert_der().clone()], identity.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The rustls client configuration of an endpoint.
pub(crate) fn client_config(
    identity: &NodeIdentity,
    ca: &CaCertificate,
    registry: Arc<dyn NodeRegistry>,
) -> Result<rustls::ClientConfig, Error> {
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(verifier_error)?;
    let verifier = Arc::new(RegisteredServerVerifier { inner, registry });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        // "dangerous" only in name: the custom verifier wraps webpki's and adds a check.
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert_der().clone()], identity.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
