//! Certificates being served: PEM material, checked and swapped whole when
//! a new generation arrives (the webhook's serving certificate, the
//! operator's SVID in SPIRE mode).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// PEM material of one certificate generation.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA that signed `cert_pem` (what goes into `caBundle`), if known.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Material")
            .field("has_ca", &self.ca_pem.is_some())
            .finish()
    }
}

/// Why certificate material is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("{0}")]
    Invalid(String),
}

/// The certificate being served, swapped whole when a new one arrives.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    material: ArcSwap<Material>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified(m: &Material) -> Result<CertifiedKey, CertError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Invalid(format!("the certificate is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CertError::Invalid("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes())
        .map_err(|e| CertError::Invalid(format!("the private key is not PEM: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::Invalid(format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| CertError::Invalid(format!("the key does not belong to the certificate: {e}")))?;
    Ok(ck)
}

impl CertStore {
    pub fn new(m: Material) -> Result<Self, CertError> {
        let ck = certified(&m)?;
        Ok(Self {
            current: ArcSwap::from_pointee(ck),
            material: ArcSwap::from_pointee(m),
        })
    }

    /// Serve `m` from now on, if it differs and is usable; the old one stays otherwise.
    pub fn update(&self, m: Material) -> Result<bool, CertError> {
        if **self.material.load() == m {
            return Ok(false);
        }
        let ck = certified(&m)?;
        self.current.store(Arc::new(ck));
        self.material.store(Arc::new(m));
        Ok(true)
    }

    /// The certificate and key being served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    pub fn material(&self) -> Arc<Material> {
        self.material.load_full()
    }

    /// The same, requiring client certificates that `verifier` accepts.
    pub fn server_config_mtls(
        self: &Arc<Self>,
        verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    ) -> Result<rustls::ServerConfig, CertError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| CertError::Invalid(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }

    /// A rustls server configuration resolving to whatever is current.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, CertError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| CertError::Invalid(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

/// `tls.crt`, `tls.key` and (if present) `ca.crt` from `dir`.
pub fn load_files(dir: &std::path::Path) -> Result<Material, CertError> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .map_err(|e| CertError::Invalid(format!("reading {}: {e}", dir.join(f).display())))
    };
    Ok(Material {
        cert_pem: read("tls.crt")?,
        key_pem: read("tls.key")?,
        ca_pem: read("ca.crt").ok(),
    })
}
