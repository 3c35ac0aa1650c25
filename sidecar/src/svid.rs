//! The sidecar's own X.509-SVID, from one of two sources:
//!
//! - the operator's built-in CA ([`keep`]): obtained at start (the sidecar
//!   is not ready before), renewed at half-life, kept while renewal fails
//!   until it expires, then gone (and every decision a deny). The operator
//!   is reached over TLS and must present the SVID of
//!   `spiffe://<trust domain>/mandate/operator`, checked against the bundle
//!   file;
//! - SPIRE ([`keep_from_workload_api`]): the SPIFFE Workload API pushes the
//!   SVID and the trust bundle, and pushes again on rotation; the same
//!   rules hold (not ready before the first, kept while updates stop until
//!   it expires, then gone). The bundle from the Workload API, not a file,
//!   verifies the operator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use arc_swap::ArcSwapOption;
use mandate_identity::verify::{SpiffeVerifier, spiffe_id_of};
use mandate_identity::workload::{self, WorkloadConfig};
use mandate_proto::identity::v1::SignSvidRequest;
use mandate_proto::identity::v1::identity_client::IdentityClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

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
    /// The leaf's private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    /// The leaf's serial number, hex.
    pub serial: String,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
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

/// The trust bundle as the Workload API last sent it (SPIRE mode).
pub type SharedBundle = Arc<ArcSwapOption<Vec<CertificateDer<'static>>>>;

/// Where the CA certificates that verify the operator come from.
#[derive(Debug, Clone)]
pub enum Bundle {
    /// A PEM file (the built-in CA's bundle, mounted from a ConfigMap), re-read each time.
    File(PathBuf),
    /// The Workload API's bundle for the trust domain (SPIRE mode).
    WorkloadApi(SharedBundle),
}

impl Bundle {
    pub fn load(&self) -> Result<Vec<CertificateDer<'static>>> {
        match self {
            Bundle::File(path) => bundle_file(path),
            Bundle::WorkloadApi(shared) => shared
                .load_full()
                .map(|b| b.as_ref().clone())
                .context("no trust bundle from the Workload API yet"),
        }
    }
}

/// How the sidecar recognises the operator: its SPIFFE ID in the trust
/// domain, verified against the bundle.
#[derive(Debug, Clone)]
pub struct OperatorTrust {
    pub bundle: Bundle,
    pub trust_domain: String,
    /// The SPIFFE ID the operator must present.
    pub server_id: String,
}

fn bundle_file(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading the trust bundle {}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not PEM certificates", path.display()))?;
    ensure!(!certs.is_empty(), "the trust bundle {} is empty", path.display());
    Ok(certs)
}

fn bundle(cfg: &SvidConfig) -> Result<Vec<CertificateDer<'static>>> {
    bundle_file(&cfg.bundle_file)
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
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_der.clone()));
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
    let serial = workload::validity_of(leaf)
        .map(|(_, _, serial)| serial)
        .map_err(anyhow::Error::msg)?;
    Ok(Svid {
        spiffe_id: id,
        identity: resp.identity,
        chain,
        key_der: key.serialize_der(),
        issued_at: SystemTime::now(),
        expires_at,
        serial,
    })
}

/// Obtain an SVID, then keep one: renew at half-life, retry with backoff
/// while the current one lasts, drop it when it expires. `on_change` runs
/// after each change (readiness, metrics), with the SVID now held.
pub async fn keep(cfg: SvidConfig, shared: SharedSvid, on_change: impl Fn(Option<&Svid>) + Send + 'static) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match fetch(&cfg).await {
            Ok(svid) => {
                tracing::info!(spiffe_id = %svid.spiffe_id, identity = %svid.identity,
                    expires_in_s = svid.expires_at.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                    "X.509-SVID obtained");
                let half = svid.expires_at.duration_since(svid.issued_at).unwrap_or_default() / 2;
                let svid = Arc::new(svid);
                shared.store(Some(svid.clone()));
                on_change(Some(&svid));
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
                        on_change(None);
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
            on_change(None);
        }
    }
}

/// SPIRE mode: keep the SVID the Workload API pushes (and its trust
/// domain's bundle) in `shared` and `bundle`. `identity` is the
/// AgentIdentity this pod was injected as (SPIRE's SVIDs do not name it);
/// when `cfg.want` is set only an SVID with exactly that SPIFFE ID is taken,
/// so the identity name and the SVID cannot disagree. `on_change` runs after
/// each change, with the SVID now held.
pub async fn keep_from_workload_api(
    cfg: WorkloadConfig,
    identity: Option<String>,
    shared: SharedSvid,
    bundle: SharedBundle,
    on_change: impl Fn(Option<&Svid>) + Send + 'static,
) {
    let mut current = workload::start(cfg);
    loop {
        let now = current.borrow_and_update().clone();
        match now {
            Some(w) => {
                let svid = Arc::new(Svid {
                    spiffe_id: w.spiffe_id.clone(),
                    identity: identity.clone().unwrap_or_default(),
                    chain: w.chain.clone(),
                    key_der: w.key_der.clone(),
                    issued_at: w.not_before,
                    expires_at: w.not_after,
                    serial: w.serial.clone(),
                });
                bundle.store(Some(Arc::new(w.bundle.clone())));
                shared.store(Some(svid.clone()));
                on_change(Some(&svid));
            }
            None => {
                if shared.load().is_some() {
                    tracing::error!("no valid SVID any more; denying every request");
                }
                shared.store(None);
                on_change(None);
            }
        }
        if current.changed().await.is_err() {
            return;
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
