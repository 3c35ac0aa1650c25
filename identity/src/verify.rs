//! X.509-SVID verification for rustls: the peer's chain must lead to the
//! trust bundle, its leaf must carry exactly one SPIFFE ID in the trust
//! domain, and that ID must be one the caller accepts. Used on both sides of
//! the sidecar ↔ operator channel (and for the operator's identity server).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The SPIFFE ID of a certificate (DER): its one `spiffe://` URI SAN.
pub fn spiffe_id_of(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad SAN extension: {e}"))?
        .ok_or("the certificate has no SAN")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] if one.starts_with("spiffe://") => Ok((*one).to_string()),
        [] => Err("the certificate carries no SPIFFE ID".into()),
        _ => Err("an X.509-SVID carries exactly one URI SAN".into()),
    }
}

/// Which peer SPIFFE IDs are acceptable.
pub type Accept = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A trust bundle that can change while it is in use (SPIRE mode: the
/// Workload API pushes bundle updates; each handshake reads the current one).
pub type SharedRoots = Arc<arc_swap::ArcSwap<Vec<CertificateDer<'static>>>>;

/// Verifies SVIDs against a trust bundle.
pub struct SpiffeVerifier {
    roots: SharedRoots,
    trust_domain: String,
    accept: Accept,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.load().len())
            .finish()
    }
}

fn bad(why: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::General(format!("peer SVID refused: {why}"))
}

impl SpiffeVerifier {
    pub fn new(roots: Vec<CertificateDer<'static>>, trust_domain: &str, accept: Accept) -> Arc<Self> {
        Self::with_shared_roots(Arc::new(arc_swap::ArcSwap::from_pointee(roots)), trust_domain, accept)
    }

    /// Verify against whatever `roots` holds at each handshake.
    pub fn with_shared_roots(roots: SharedRoots, trust_domain: &str, accept: Accept) -> Arc<Self> {
        Arc::new(Self {
            roots,
            trust_domain: trust_domain.into(),
            accept,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// Accept only `id`.
    pub fn exactly(roots: Vec<CertificateDer<'static>>, trust_domain: &str, id: &str) -> Arc<Self> {
        let id = id.to_string();
        Self::new(roots, trust_domain, Arc::new(move |peer| peer == id))
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<String, rustls::Error> {
        let roots = self.roots.load();
        let anchors = roots
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("unusable trust bundle: {e}")))?;
        let ee =
            webpki::EndEntityCert::try_from(end_entity).map_err(|e| bad(format!("unreadable certificate: {e}")))?;
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| bad(format!("not issued by the trust bundle, or not valid now ({e})")))?;
        let id = spiffe_id_of(end_entity).map_err(bad)?;
        let in_domain = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.split_once('/'))
            .is_some_and(|(td, _)| td == self.trust_domain);
        if !in_domain {
            return Err(bad(format!("{id} is not in trust domain {}", self.trust_domain)));
        }
        if !(self.accept)(&id) {
            return Err(bad(format!("{id} is not a peer this side accepts")));
        }
        Ok(id)
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The SPIFFE ID, not the host name, is what identifies the peer.
        self.check(end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
