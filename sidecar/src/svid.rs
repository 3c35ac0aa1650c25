//! The sidecar's own X.509-SVID, from the operator's built-in CA: obtained
//! at start (the sidecar is not ready before), renewed at half-life, kept
//! while renewal fails until it expires, then gone (and every decision a
//! deny). The operator is reached over TLS and must present the SVID of
//! `spiffe://<trust domain>/mandate/operator`, checked against the bundle.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use arc_swap::ArcSwapOption;
use mandate_operator::spiffe::verify::{SpiffeVerifier, spiffe_id_of};
use mandate_proto::identity::v1::SignSvidRequest;
use mandate_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Where and how to get the SVID.
#[derive(Debug, Clone)]
pub struct SvidConfig {
    /// `https://host:port` of the operator's signing service.
    pub server: String,
    /// The pod's projected service-account token (audience `mandate`), re-read each time.
    pub token_file: PathBuf,
    /// PEM CA certificates of the trust domain.
    pub bundle_file: PathBuf,
    pub trust_domain: String,
    /// The SPIFFE ID the signing service must present.
    pub server_id: String,
}

/// An SVID in hand.
#[derive(Clone)]
pub struct Svid {
    pub spiffe_id: String,
    /// The AgentIdentity it was issued for.
    pub identity: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pem: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Svid {
    pub fn valid_now(&self) -> bool {
        SystemTime::now() < self.expires_at
    }
}

/// The current SVID, if any, shared with the request path.
pub type SharedSvid = Arc<ArcSwapOption<Svid>>;

fn bundle(cfg: &SvidConfig) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(&cfg.bundle_file)
        .with_context(|| format!("reading the trust bundle {}", cfg.bundle_file.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not PEM certificates", cfg.bundle_file.display()))?;
    ensure!(
        !certs.is_empty(),
        "the trust bundle {} is empty",
        cfg.bundle_file.display()
    );
    Ok(certs)
}

/// A gRPC channel to the operator over TLS, verifying it as `server_id`
/// against `roots`, presenting `client` (an SVID chain and its key, PEM)
/// when given.
pub async fn channel(
    server: &str,
    roots: Vec<CertificateDer<'static>>,
    trust_domain: &str,
    server_id: &str,
    client: Option<&Svid>,
) -> Result<tonic::transport::Channel> {
    let verifier = SpiffeVerifier::exactly(roots, trust_domain, server_id);
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match client {
        Some(svid) => {
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes()).context("the SVID's key")?;
            builder.with_client_auth_cert(svid.chain.clone(), key)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let uri: hyper::Uri = server.parse().with_context(|| format!("bad server address {server}"))?;
    let authority = uri
        .authority()
        .context("the server address has no host:port")?
        .to_string();
    let channel = tonic::transport::Endpoint::from_shared(server.replace("https://", "http://"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: hyper::Uri| {
            let (connector, authority) = (connector.clone(), authority.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&authority).await?;
                // The name is not checked (the SPIFFE ID is); SNI wants one.
                let name = ServerName::try_from("mandate-operator").map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .with_context(|| format!("connecting to {server}"))?;
    Ok(channel)
}

/// The trust bundle in `cfg`.
pub fn read_bundle(cfg: &SvidConfig) -> Result<Vec<CertificateDer<'static>>> {
    bundle(cfg)
}

/// Ask the operator for a new SVID.
pub async fn fetch(cfg: &SvidConfig) -> Result<Svid> {
    let token = std::fs::read_to_string(&cfg.token_file)
        .with_context(|| format!("reading the service-account token {}", cfg.token_file.display()))?;
    let roots = bundle(cfg)?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;

    let channel = channel(&cfg.server, roots, &cfg.trust_domain, &cfg.server_id, None).await?;
    let resp = IdentityClient::new(channel)
        .sign_svid(SignSvidRequest {
            csr: csr.der().to_vec(),
            token: token.trim().to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("the operator refused an SVID: {}", s.message()))?
        .into_inner();

    let chain: Vec<CertificateDer<'static>> = resp.cert_chain.into_iter().map(CertificateDer::from).collect();
    let leaf = chain.first().context("the operator sent no certificate")?;
    let id = spiffe_id_of(leaf).map_err(anyhow::Error::msg)?;
    ensure!(
        id == resp.spiffe_id,
        "the SVID says {id}, the answer {}",
        resp.spiffe_id
    );
    let expires_at = UNIX_EPOCH + Duration::from_secs(u64::try_from(resp.expires_at_unix).unwrap_or(0));
    ensure!(expires_at > SystemTime::now(), "the operator sent an expired SVID");
    Ok(Svid {
        spiffe_id: id,
        identity: resp.identity,
        chain,
        key_pem: key.serialize_pem(),
        issued_at: SystemTime::now(),
        expires_at,
    })
}

/// Obtain an SVID, then keep one: renew at half-life, retry with backoff
/// while the current one lasts, drop it when it expires. `on_change` runs
/// after each change (readiness).
pub async fn keep(cfg: SvidConfig, shared: SharedSvid, on_change: impl Fn(bool) + Send + 'static) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match fetch(&cfg).await {
            Ok(svid) => {
                tracing::info!(spiffe_id = %svid.spiffe_id, identity = %svid.identity,
                    expires_in_s = svid.expires_at.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                    "X.509-SVID obtained");
                let half = svid.expires_at.duration_since(svid.issued_at).unwrap_or_default() / 2;
                shared.store(Some(Arc::new(svid)));
                on_change(true);
                backoff = Duration::from_millis(500);
                tokio::time::sleep(half.max(Duration::from_secs(1))).await;
            }
            Err(e) => {
                let current = shared.load_full();
                match current {
                    Some(s) if s.valid_now() => {
                        tracing::warn!(error = %format!("{e:#}"), "SVID renewal failed; the current one stays until it expires");
                        let left = s.expires_at.duration_since(SystemTime::now()).unwrap_or_default();
                        tokio::time::sleep(backoff.min(left)).await;
                    }
                    Some(_) => {
                        tracing::error!(error = %format!("{e:#}"), "the SVID expired and cannot be renewed; denying every request");
                        shared.store(None);
                        on_change(false);
                        tokio::time::sleep(backoff).await;
                    }
                    None => {
                        tracing::warn!(error = %format!("{e:#}"), "no SVID yet; retrying");
                        tokio::time::sleep(backoff).await;
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
        // An SVID that expires while we sleep is dropped at once.
        if let Some(s) = shared.load_full()
            && !s.valid_now()
        {
            shared.store(None);
            on_change(false);
        }
    }
}

/// Check a fetched SVID's chain against a bundle (used by tests and `--svid-check`).
pub fn verify_chain(svid: &Svid, bundle_pem: &[u8], trust_domain: &str) -> Result<()> {
    let roots: Vec<_> = CertificateDer::pem_slice_iter(bundle_pem).collect::<Result<_, _>>()?;
    let v = SpiffeVerifier::exactly(roots, trust_domain, &svid.spiffe_id);
    let (leaf, rest) = svid.chain.split_first().context("empty chain")?;
    use rustls::server::danger::ClientCertVerifier as _;
    if let Err(e) = v.verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now()) {
        bail!("{e}");
    }
    Ok(())
}
