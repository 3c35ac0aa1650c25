//! SPIRE mode: X.509-SVIDs and trust bundles from the SPIFFE Workload API
//! (the SPIRE agent's socket, mounted into the pod by the SPIFFE CSI
//! driver), through the `spiffe` crate. Used by the sidecar for its own SVID
//! and by the operator for the SVID its policy service presents.
//!
//! [`watch`] keeps one SVID current: it subscribes to the agent's stream,
//! takes every update it pushes (rotation), reconnects with backoff when the
//! stream is lost, keeps the SVID it has while updates stop, and drops it
//! the moment it expires. Holders see `None` until the first SVID and after
//! an expiry; they must then refuse to act (the sidecar denies everything).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier as _;
use spiffe::{TrustDomain, WorkloadApiClient, X509Context};
use tokio::sync::watch;

use crate::verify::SpiffeVerifier;

pub use mandate_api::env::IdentitySource;

/// The environment variable naming the Workload API socket (SPIFFE standard).
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// One X.509-SVID with the bundle of its trust domain, as the Workload API
/// sent them (validity read from the leaf).
#[derive(Clone)]
pub struct WorkloadSvid {
    pub spiffe_id: String,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// CA certificates of the trust domain.
    pub bundle: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf's serial number, hex.
    pub serial: String,
}

impl std::fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("WorkloadSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("bundle", &self.bundle.len())
            .finish()
    }
}

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

impl WorkloadSvid {
    pub fn valid_now(&self) -> bool {
        SystemTime::now() < self.not_after
    }

    /// As PEM TLS material (the chain, its key, the bundle as the CA).
    pub fn material(&self) -> crate::certs::Material {
        crate::certs::Material {
            cert_pem: self.chain.iter().map(|c| pem("CERTIFICATE", c)).collect(),
            key_pem: pem("PRIVATE KEY", &self.key_der),
            ca_pem: Some(self.bundle.iter().map(|c| pem("CERTIFICATE", c)).collect()),
        }
    }
}

/// Validity and serial of a certificate (DER).
pub fn validity_of(der: &[u8]) -> Result<(SystemTime, SystemTime, String), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let v = cert.validity();
    Ok((
        at(v.not_before.timestamp()),
        at(v.not_after.timestamp()),
        cert.raw_serial_as_string().replace(':', ""),
    ))
}

/// What to ask the Workload API for.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// `unix:///path/to/socket` (or `tcp://ip:port`).
    pub endpoint: String,
    /// The SVID must be in this trust domain, and is verified against its bundle.
    pub trust_domain: String,
    /// Take the SVID with this SPIFFE ID (a workload may be issued several);
    /// none: the default (first) one.
    pub want: Option<String>,
}

/// The SVID to use from one Workload API update, checked: the one asked for
/// (or the default), in the trust domain, chaining to that domain's bundle,
/// valid now.
pub fn select(ctx: &X509Context, cfg: &WorkloadConfig) -> Result<WorkloadSvid, String> {
    let svid = match &cfg.want {
        Some(want) => ctx
            .svids()
            .iter()
            .find(|s| s.spiffe_id().to_string() == *want)
            .ok_or_else(|| {
                let got: Vec<String> = ctx.svids().iter().map(|s| s.spiffe_id().to_string()).collect();
                format!(
                    "the Workload API issued {} but not {want} (does the SPIRE registration match the AgentIdentity?)",
                    got.join(", ")
                )
            })?,
        None => ctx.default_svid().ok_or("the Workload API sent no SVID")?,
    };
    let spiffe_id = svid.spiffe_id().to_string();
    let td = TrustDomain::new(&cfg.trust_domain).map_err(|e| format!("bad trust domain {}: {e}", cfg.trust_domain))?;
    if !svid.spiffe_id().is_member_of(&td) {
        return Err(format!("{spiffe_id} is not in the trust domain {}", cfg.trust_domain));
    }
    let bundle: Vec<CertificateDer<'static>> = ctx
        .bundle_set()
        .get(&td)
        .ok_or_else(|| format!("the Workload API sent no bundle for {}", cfg.trust_domain))?
        .authorities()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    if bundle.is_empty() {
        return Err(format!("the bundle of {} is empty", cfg.trust_domain));
    }
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let (leaf, rest) = chain.split_first().ok_or("the SVID has no certificate")?;
    let (not_before, not_after, serial) = validity_of(leaf)?;
    SpiffeVerifier::exactly(bundle.clone(), &cfg.trust_domain, &spiffe_id)
        .verify_client_cert(leaf, rest, UnixTime::now())
        .map_err(|e| format!("the SVID does not verify against its bundle: {e}"))?;
    Ok(WorkloadSvid {
        spiffe_id,
        chain,
        key_der: svid.private_key().as_bytes().to_vec(),
        bundle,
        not_before,
        not_after,
        serial,
    })
}

/// The current SVID as [`watch`] publishes it: none before the first and
/// after an expiry.
pub type Current = watch::Receiver<Option<Arc<WorkloadSvid>>>;

/// When the current SVID expires, as a tokio instant.
fn deadline(tx: &watch::Sender<Option<Arc<WorkloadSvid>>>) -> Option<tokio::time::Instant> {
    tx.borrow()
        .as_ref()
        .map(|s| tokio::time::Instant::now() + s.not_after.duration_since(SystemTime::now()).unwrap_or_default())
}

async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn expire(tx: &watch::Sender<Option<Arc<WorkloadSvid>>>) {
    let expired = tx.borrow().as_ref().is_some_and(|s| !s.valid_now());
    if expired {
        tracing::error!("the X.509-SVID expired with no update from the Workload API; it is dropped");
        tx.send_replace(None);
    }
}

/// Start [`watch`] in the background; the receiver sees each change.
pub fn start(cfg: WorkloadConfig) -> Current {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(watch(cfg, tx));
    rx
}

/// Keep the current SVID in `tx` (see the module's documentation). Runs
/// until every receiver is gone.
pub async fn watch(cfg: WorkloadConfig, tx: watch::Sender<Option<Arc<WorkloadSvid>>>) {
    let mut backoff = Duration::from_millis(200);
    while !tx.is_closed() {
        match WorkloadApiClient::connect_to(&cfg.endpoint).await {
            Err(e) => {
                tracing::warn!(endpoint = %cfg.endpoint, error = %e, "cannot reach the SPIFFE Workload API; retrying")
            }
            Ok(client) => match client.stream_x509_contexts().await {
                Err(e) => {
                    tracing::warn!(endpoint = %cfg.endpoint, error = %e, "the SPIFFE Workload API refused the X.509-SVID stream; retrying")
                }
                Ok(mut stream) => loop {
                    let expiry = deadline(&tx);
                    tokio::select! {
                        next = stream.next() => match next {
                            Some(Ok(ctx)) => match select(&ctx, &cfg) {
                                Ok(svid) => {
                                    tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial,
                                        expires_in_s = svid.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                                        "X.509-SVID from the Workload API");
                                    backoff = Duration::from_millis(200);
                                    tx.send_replace(Some(Arc::new(svid)));
                                }
                                Err(e) => tracing::error!(error = %e, "an unusable update from the Workload API; the current SVID (if any) stays until it expires"),
                            },
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "the Workload API stream failed; the current SVID stays until it expires; reconnecting");
                                break;
                            }
                            None => {
                                tracing::warn!("the Workload API stream ended; the current SVID stays until it expires; reconnecting");
                                break;
                            }
                        },
                        () = until(expiry) => expire(&tx),
                        () = tx.closed() => return,
                    }
                },
            },
        }
        expire(&tx);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = until(deadline(&tx)) => expire(&tx),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
