//! TLS interception, the sidecar's half: the pod's CA, the leaves it
//! issues, the trust bundle the agent's containers read, and the bounded
//! cache of live leaves that [`crate::sds`] serves to Envoy.
//!
//! - The CA ([`PodCa`]) is made at start, in memory only: its key is never
//!   written anywhere and dies with the process. ECDSA P-256,
//!   `BasicConstraints CA pathlen 0`, key usage certSign and cRLSign, valid
//!   for a bounded time (30 days by default).
//! - A leaf ([`PodCa::mint`]) names one host: exactly one SAN (a DNS name,
//!   or an IP address), serverAuth, a fresh key each, short-lived (24 h by
//!   default, never past the CA), renewed at half its life.
//! - [`publish_bundle`] writes `ca.crt` (the pod CA alone) and `bundle.crt`
//!   (the system roots, then the pod CA), each atomically (a temporary file
//!   renamed over it), mode 0644.
//! - [`Interceptor`] decides which names get a leaf (the policies in force,
//!   [`mandate_policy::engine::PolicySet::intercepts`]) and keeps at most
//!   `max_names` leaves, evicting the least recently used.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mandate_policy::engine::{SharedPolicies, normalize_host};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::metrics::Metrics;

/// The SDS resource name Envoy's SNI mapper asks for when a ClientHello
/// carries no SNI (its `default_value`): always refused, so such a
/// handshake fails.
pub const NO_SNI_NAME: &str = "mandate-no-sni";
/// Where Debian-like images keep the system's trusted roots.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Default lifetime of the pod CA.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of a leaf.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default bound on the names holding a leaf at once.
pub const DEFAULT_MAX_NAMES: usize = 1024;
/// Certificates start this much before they are made (clock skew between
/// containers is nil, but clients elsewhere may compare with their own).
const BACKDATE: Duration = Duration::from_secs(300);

/// Why interception could not be set up, or a leaf not be made.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("generating the pod CA: {0}")]
    Ca(#[source] rcgen::Error),
    #[error("issuing a leaf for {name:?}: {source}")]
    Mint {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the pod CA expired (it lives --ca-lifetime-hours); restart the pod for a new one")]
    CaExpired,
    #[error("cannot read the system roots {path} (--system-roots): {source}")]
    ReadRoots {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the system roots {path} (--system-roots) hold no PEM certificate{detail}")]
    NoRoots { path: PathBuf, detail: String },
    #[error("cannot write {path} (--ca-bundle-dir must be a writable directory): {source}")]
    Publish {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The pod's CA: its certificate, and its key in memory only.
pub struct PodCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for PodCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCa")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What a leaf names: one DNS name or one IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeafSubject {
    Dns(String),
    Ip(IpAddr),
}

impl LeafSubject {
    /// The subject for an SDS resource name (an SNI), normalized (lower
    /// case, no trailing dot); `None` when it is neither a syntactically
    /// valid DNS name nor an IP address (wildcards, spaces, empty labels...).
    pub fn parse(name: &str) -> Option<Self> {
        let norm = normalize_host(name);
        if norm.is_empty() || norm.len() > 253 || norm.contains('*') {
            return None;
        }
        match ServerName::try_from(norm.as_str()).ok()? {
            ServerName::DnsName(d) => Some(Self::Dns(d.as_ref().to_string())),
            ServerName::IpAddress(ip) => Some(Self::Ip(IpAddr::from(ip))),
            _ => None,
        }
    }

    /// The name as policies compare it (the cache's key too).
    pub fn key(&self) -> String {
        match self {
            Self::Dns(d) => d.clone(),
            Self::Ip(ip) => ip.to_string(),
        }
    }
}

/// One leaf: its chain (leaf, then the pod CA) and key, in PEM.
pub struct Leaf {
    /// The leaf's certificate followed by the pod CA's.
    pub chain_pem: String,
    key_pem: String,
    /// The serial number, hex: the SDS resource version.
    pub serial: String,
    pub minted_at: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Leaf {
    /// The leaf's private key (PKCS#8 PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When it should be replaced: half-way through its life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.minted_at).unwrap_or_default();
        self.minted_at + life / 2
    }
}

fn serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and non-zero in DER.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

impl PodCa {
    /// A new CA for the pod `pod` (its name, in the CA's common name),
    /// valid from now for `lifetime`.
    ///
    /// Not name-constrained: a name constraint is fixed when the CA is
    /// made, but what the pod intercepts follows the policies in force,
    /// which change while it runs (and an `excluded` list cannot name "all
    /// the rest"). What bounds this CA instead: its key exists only in this
    /// process's memory, pathlen 0, only this pod's containers trust it, it
    /// expires, and it only ever signs names a policy declares.
    pub fn generate(pod: Option<&str>, lifetime: Duration) -> Result<Self, InterceptError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(InterceptError::Ca)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A common name is at most 64 characters; a pod's name can be longer.
        let cn = match pod {
            Some(pod) if !pod.is_empty() => {
                let pod: String = pod.chars().take(64 - "Mandate pod CA ".len()).collect();
                format!("Mandate pod CA {pod}")
            }
            _ => "Mandate pod CA".to_string(),
        };
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, "Mandate");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - BACKDATE).into();
        let not_after = now + lifetime;
        params.not_after = not_after.into();
        params.serial_number = Some(serial().0);
        let cert = params.self_signed(&key).map_err(InterceptError::Ca)?;
        Ok(Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// When the CA expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// A leaf for `subject`, valid from now for `lifetime` or until the CA
    /// expires, whichever comes first; a fresh key.
    pub fn mint(&self, subject: &LeafSubject, lifetime: Duration) -> Result<Leaf, InterceptError> {
        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(InterceptError::CaExpired);
        }
        let mint_err = |source| InterceptError::Mint {
            name: subject.key(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(mint_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let san = match subject {
            LeafSubject::Dns(name) => {
                // A CN for old tools that print it; clients check the SAN.
                if name.len() <= 64 {
                    dn.push(DnType::CommonName, name.as_str());
                }
                SanType::DnsName(name.as_str().try_into().map_err(mint_err)?)
            }
            LeafSubject::Ip(ip) => SanType::IpAddress(*ip),
        };
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - BACKDATE).into();
        let not_after = (now + lifetime).min(self.not_after);
        params.not_after = not_after.into();
        let (serial_number, serial) = serial();
        params.serial_number = Some(serial_number);
        let cert = params.signed_by(&key, &self.issuer).map_err(mint_err)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
            serial,
            minted_at: now,
            not_after,
        })
    }
}

/// Write `ca.crt` (the pod CA) and `bundle.crt` (the system roots read
/// from `roots`, then the pod CA) into `dir` (made if missing), each
/// atomically, mode 0644. Fails when the roots hold no certificate or the
/// directory cannot be written.
pub fn publish_bundle(dir: &Path, ca_pem: &str, roots: &Path) -> Result<(), InterceptError> {
    let system = std::fs::read(roots).map_err(|source| InterceptError::ReadRoots {
        path: roots.to_path_buf(),
        source,
    })?;
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(&system) {
        if let Err(e) = cert {
            return Err(InterceptError::NoRoots {
                path: roots.to_path_buf(),
                detail: format!(" that parses: {e:?}"),
            });
        }
        count += 1;
    }
    if count == 0 {
        return Err(InterceptError::NoRoots {
            path: roots.to_path_buf(),
            detail: String::new(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| InterceptError::Publish {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut bundle = system;
    if !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca_pem.as_bytes());
    write_atomically(&dir.join("ca.crt"), ca_pem.as_bytes())?;
    write_atomically(&dir.join("bundle.crt"), &bundle)?;
    tracing::info!(dir = %dir.display(), roots = count, "pod CA published: ca.crt, bundle.crt");
    Ok(())
}

/// Write `path` whole or not at all: a temporary file beside it, flushed,
/// then renamed over it. Mode 0644 whatever the umask.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), InterceptError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let err = |source| InterceptError::Publish {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Why a name gets no leaf (a bounded label set for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The ClientHello carried no SNI ([`NO_SNI_NAME`]).
    NoSni,
    /// Not a DNS name or an IP address.
    Malformed,
    /// No policy in force declares it for interception.
    Undeclared,
    /// A policy in force declares it Passthrough.
    Passthrough,
    /// More names on one SDS stream than the bound.
    Capacity,
    /// Its leaf was evicted from the bounded cache (Envoy asks again at
    /// the next handshake); counted as an eviction, not a refusal.
    Evicted,
    /// The leaf could not be made (logged with the error).
    Error,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::NoSni => "no_sni",
            Self::Malformed => "malformed",
            Self::Undeclared => "undeclared",
            Self::Passthrough => "passthrough",
            Self::Capacity => "capacity",
            Self::Evicted => "evicted",
            Self::Error => "error",
        }
    }

    /// What the log says.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoSni => "the ClientHello carries no SNI",
            Self::Malformed => "the name is neither a DNS name nor an IP address",
            Self::Undeclared => "no policy in force declares this host with tlsMode Intercept",
            Self::Passthrough => "a policy in force declares this host tlsMode Passthrough",
            Self::Capacity => "this SDS stream asked for more names than --max-intercepted-names",
            Self::Evicted => "its leaf was evicted (--max-intercepted-names); the next handshake gets a new one",
            Self::Error => "no leaf could be issued",
        }
    }
}

/// Interception's settings.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    pub leaf_lifetime: Duration,
    /// At most this many names hold a leaf at once.
    pub max_names: usize,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        Self {
            leaf_lifetime: DEFAULT_LEAF_LIFETIME,
            max_names: DEFAULT_MAX_NAMES,
        }
    }
}

/// One cached leaf. `slot` identifies this entry's life in the cache: an
/// evicted and re-made entry has another, so a stream holding the old one
/// knows it was evicted.
#[derive(Debug)]
struct Entry {
    slot: u64,
    subject: LeafSubject,
    leaf: Arc<Leaf>,
    last_used: u64,
    /// SDS subscriptions this leaf was sent to and not yet released.
    holders: usize,
}

#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<String, Entry>,
    tick: u64,
    next_slot: u64,
}

/// The pod's CA, the policies in force and the bounded cache of live
/// leaves; shared by every SDS stream.
#[derive(Debug)]
pub struct Interceptor {
    ca: PodCa,
    cfg: InterceptConfig,
    policies: SharedPolicies,
    metrics: Arc<Metrics>,
    cache: Mutex<Cache>,
    /// Bumped whenever a stream may have to push something: the policies
    /// changed, a leaf was evicted, renewed or dropped.
    changes: tokio::sync::watch::Sender<u64>,
    /// Refusal log lines in the current minute (start, count).
    refusal_lines: Mutex<(std::time::Instant, u32)>,
}

/// Refusals logged per minute at most (every one is counted in metrics):
/// an agent making up SNIs cannot flood the log.
pub const REFUSAL_LINES_PER_MINUTE: u32 = 100;

impl Interceptor {
    pub fn new(ca: PodCa, cfg: InterceptConfig, policies: SharedPolicies, metrics: Arc<Metrics>) -> Self {
        let expiry = ca
            .not_after()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        metrics.intercept_ca_expiry.set(expiry);
        Self {
            ca,
            cfg,
            policies,
            metrics,
            cache: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
            refusal_lines: Mutex::new((std::time::Instant::now(), 0)),
        }
    }

    /// Whether one more refusal may be logged this minute (the first one
    /// over the limit says so).
    pub fn may_log_refusal(&self) -> bool {
        let mut lines = self.refusal_lines.lock().unwrap_or_else(PoisonError::into_inner);
        let now = std::time::Instant::now();
        if now.duration_since(lines.0) >= Duration::from_secs(60) {
            *lines = (now, 0);
        }
        lines.1 = lines.1.saturating_add(1);
        if lines.1 == REFUSAL_LINES_PER_MINUTE + 1 {
            tracing::warn!(
                limit = REFUSAL_LINES_PER_MINUTE,
                "TLS interception: more refusals this minute than are logged; the rest are only counted (mandate_sidecar_intercept_refusals_total)"
            );
        }
        lines.1 <= REFUSAL_LINES_PER_MINUTE
    }

    pub fn ca(&self) -> &PodCa {
        &self.ca
    }

    pub fn config(&self) -> &InterceptConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Notified on every change a stream may have to act on.
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Tell the streams to look again (the policies changed).
    pub fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // A panic elsewhere while holding it leaves a consistent map.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the SDS resource `name` gets a leaf under the policies in
    /// force: its subject, or why not.
    pub fn decide(&self, name: &str) -> Result<LeafSubject, Refusal> {
        if name == NO_SNI_NAME {
            return Err(Refusal::NoSni);
        }
        let subject = LeafSubject::parse(name).ok_or(Refusal::Malformed)?;
        let key = subject.key();
        let policies = self.policies.load();
        if policies.passes_through(&key) {
            Err(Refusal::Passthrough)
        } else if policies.intercepts(&key) {
            Ok(subject)
        } else {
            Err(Refusal::Undeclared)
        }
    }

    /// Take the leaf for `subject` (made now if none is cached), counted as
    /// held until [`Interceptor::release`]; its slot and the leaf. Making
    /// room evicts the least recently taken other name.
    pub fn acquire(&self, subject: &LeafSubject) -> Result<(u64, Arc<Leaf>), InterceptError> {
        let key = subject.key();
        let mut evicted = None;
        let out = {
            let mut cache = self.cache();
            cache.tick += 1;
            let tick = cache.tick;
            if let Some(e) = cache.entries.get_mut(&key) {
                e.last_used = tick;
                e.holders += 1;
                return Ok((e.slot, e.leaf.clone()));
            }
            let leaf = Arc::new(self.ca.mint(subject, self.cfg.leaf_lifetime)?);
            self.metrics.intercept_minted("new");
            if cache.entries.len() >= self.cfg.max_names.max(1) {
                let lru = cache
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(lru) = lru {
                    cache.entries.remove(&lru);
                    evicted = Some(lru);
                }
            }
            cache.next_slot += 1;
            let slot = cache.next_slot;
            cache.entries.insert(
                key.clone(),
                Entry {
                    slot,
                    subject: subject.clone(),
                    leaf: leaf.clone(),
                    last_used: tick,
                    holders: 1,
                },
            );
            self.metrics.intercept_leaves.set(gauge(cache.entries.len()));
            (slot, leaf)
        };
        tracing::info!(name = %key, not_after = %unix(out.1.not_after), "TLS interception: leaf issued");
        if let Some(lru) = evicted {
            self.metrics.intercept_evicted.inc();
            tracing::info!(name = %lru, bound = self.cfg.max_names, "TLS interception: least recently used leaf evicted; it is removed over SDS");
            self.notify();
        }
        Ok(out)
    }

    /// The leaf now cached in `slot` for `key` (renewed or not); `None`
    /// once that entry is gone (evicted, or expired unrenewed).
    pub fn current(&self, key: &str, slot: u64) -> Option<Arc<Leaf>> {
        self.cache()
            .entries
            .get(key)
            .filter(|e| e.slot == slot)
            .map(|e| e.leaf.clone())
    }

    /// One holder of `slot` for `key` is done with it; the leaf is dropped
    /// with its last holder.
    pub fn release(&self, key: &str, slot: u64) {
        let mut cache = self.cache();
        let gone = match cache.entries.get_mut(key) {
            Some(e) if e.slot == slot => {
                e.holders = e.holders.saturating_sub(1);
                e.holders == 0
            }
            _ => false,
        };
        if gone {
            cache.entries.remove(key);
            self.metrics.intercept_leaves.set(gauge(cache.entries.len()));
        }
    }

    /// Renew every leaf past half its life (same slot, a new leaf); drop
    /// those that expired without renewal. Whether anything changed
    /// (streams are told).
    pub fn renew_due(&self) -> bool {
        let now = SystemTime::now();
        let mut changed = false;
        {
            let mut cache = self.cache();
            let mut expired = Vec::new();
            for (key, e) in cache.entries.iter_mut() {
                if e.leaf.renew_at() > now {
                    continue;
                }
                match self.ca.mint(&e.subject, self.cfg.leaf_lifetime) {
                    Ok(leaf) => {
                        tracing::info!(name = %key, not_after = %unix(leaf.not_after), "TLS interception: leaf renewed");
                        self.metrics.intercept_minted("renewal");
                        e.leaf = Arc::new(leaf);
                        changed = true;
                    }
                    Err(err) => {
                        tracing::error!(name = %key, error = %err, "TLS interception: a leaf could not be renewed");
                        if e.leaf.not_after <= now {
                            expired.push(key.clone());
                        }
                    }
                }
            }
            for key in expired {
                cache.entries.remove(&key);
                changed = true;
            }
            self.metrics.intercept_leaves.set(gauge(cache.entries.len()));
        }
        if changed {
            self.notify();
        }
        changed
    }

    /// How many names hold a leaf now.
    pub fn live(&self) -> usize {
        self.cache().entries.len()
    }

    /// Renew leaves on time, and tell the streams when the policy set in
    /// force changes (it is swapped whole, so a new `Arc` is a change).
    pub async fn run(self: Arc<Self>) {
        let renew_every = (self.cfg.leaf_lifetime / 8).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut renew = tokio::time::interval(renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = tokio::time::interval(Duration::from_millis(200));
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = self.policies.load_full();
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    self.renew_due();
                }
                _ = watch.tick() => {
                    let now = self.policies.load_full();
                    if !Arc::ptr_eq(&now, &seen) {
                        seen = now;
                        tracing::debug!("TLS interception: the policy set changed; every subscribed name is checked again");
                        self.notify();
                    }
                }
            }
        }
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A time as Unix seconds, for logs.
fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;
    use mandate_api::crd::AgentPolicySpec;
    use mandate_policy::engine::{LoadedPolicy, PolicySet};
    use x509_parser::prelude::*;

    fn der(pem_text: &str) -> Vec<Vec<u8>> {
        CertificateDer::pem_slice_iter(pem_text.as_bytes())
            .map(|c| c.unwrap().to_vec())
            .collect()
    }

    pub(crate) fn policies(egress: serde_json::Value) -> SharedPolicies {
        let spec: AgentPolicySpec = serde_json::from_value(serde_json::json!({
            "modules": [{"name": "authz.rego", "rego": "package mandate.authz\nimport rego.v1\ndefault decision := false\n"}],
            "egress": egress,
        }))
        .unwrap();
        Arc::new(arc_swap::ArcSwap::from_pointee(PolicySet {
            policies: vec![LoadedPolicy::compile("p".into(), &spec).unwrap()],
            ..PolicySet::default()
        }))
    }

    #[test]
    fn the_ca_is_a_p256_pathlen_0_ca_for_the_pod_with_bounded_validity() {
        let ca = PodCa::generate(Some("agent-7f9c"), DEFAULT_CA_LIFETIME).unwrap();
        let ders = der(ca.pem());
        assert_eq!(ders.len(), 1);
        let (_, cert) = X509Certificate::from_der(&ders[0]).unwrap();
        assert_eq!(
            cert.subject().iter_common_name().next().unwrap().as_str().unwrap(),
            "Mandate pod CA agent-7f9c"
        );
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        assert_eq!(
            cert.public_key()
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok()),
            Some(x509_parser::oid_registry::OID_EC_P256)
        );
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86400;
        assert!((29..=31).contains(&days), "{days} days");
        // A long pod name still makes a valid common name.
        let long = "x".repeat(200);
        let ca = PodCa::generate(Some(&long), DEFAULT_CA_LIFETIME).unwrap();
        let ders = der(ca.pem());
        let (_, cert) = X509Certificate::from_der(&ders[0]).unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap()
                .len(),
            64
        );
    }

    #[test]
    fn a_leaf_has_one_san_server_auth_a_fresh_key_and_chains_to_the_ca() {
        let ca = PodCa::generate(None, DEFAULT_CA_LIFETIME).unwrap();
        let subject = LeafSubject::parse("API.Example.com.").unwrap();
        assert_eq!(subject, LeafSubject::Dns("api.example.com".into()));
        let a = ca.mint(&subject, DEFAULT_LEAF_LIFETIME).unwrap();
        let b = ca.mint(&subject, DEFAULT_LEAF_LIFETIME).unwrap();
        assert_ne!(a.key_pem(), b.key_pem(), "a fresh key per leaf");
        assert_ne!(a.serial, b.serial);
        let chain = der(&a.chain_pem);
        assert_eq!(chain.len(), 2, "leaf then CA");
        assert_eq!(chain[1], der(ca.pem())[0]);
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let (_, ca_cert) = X509Certificate::from_der(&chain[1]).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
        let san = leaf.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names, [GeneralName::DNSName("api.example.com")]);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!leaf.basic_constraints().unwrap().is_some_and(|b| b.value.ca));
        let hours = (leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp()) / 3600;
        assert!((24..=25).contains(&hours), "{hours} h");
        assert_eq!(
            leaf.serial.to_str_radix(16).trim_start_matches('0'),
            a.serial.trim_start_matches('0')
        );
        // The renewal point is half-way through.
        let half = a.renew_at().duration_since(a.minted_at).unwrap();
        assert_eq!(half, DEFAULT_LEAF_LIFETIME / 2);

        // An IP address gets an IP SAN.
        let ip = ca
            .mint(&LeafSubject::parse("10.1.2.3").unwrap(), DEFAULT_LEAF_LIFETIME)
            .unwrap();
        let ders = der(&ip.chain_pem);
        let (_, cert) = X509Certificate::from_der(&ders[0]).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names, [GeneralName::IPAddress(&[10, 1, 2, 3])]);
    }

    #[test]
    fn leaves_never_outlive_the_ca_and_an_expired_ca_issues_nothing() {
        let ca = PodCa::generate(None, Duration::from_secs(3600)).unwrap();
        let leaf = ca
            .mint(&LeafSubject::Dns("a.example".into()), DEFAULT_LEAF_LIFETIME)
            .unwrap();
        assert_eq!(leaf.not_after, ca.not_after());
        let dead = PodCa::generate(None, Duration::ZERO).unwrap();
        assert!(matches!(
            dead.mint(&LeafSubject::Dns("a.example".into()), DEFAULT_LEAF_LIFETIME),
            Err(InterceptError::CaExpired)
        ));
    }

    #[test]
    fn malformed_names_have_no_subject() {
        for bad in [
            "",
            ".",
            "*.example.com",
            "a b.example",
            "a..b",
            "-",
            "exa mple",
            &"a".repeat(254),
            "a/b",
            "a:b",
        ] {
            assert_eq!(LeafSubject::parse(bad), None, "{bad:?}");
        }
        assert_eq!(LeafSubject::parse("::1"), Some(LeafSubject::Ip("::1".parse().unwrap())));
        assert_eq!(
            LeafSubject::parse("localhost"),
            Some(LeafSubject::Dns("localhost".into()))
        );
    }

    #[test]
    fn the_bundle_is_published_atomically_with_mode_0644() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("mandate-bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let roots_ca = PodCa::generate(Some("roots"), DEFAULT_CA_LIFETIME).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let roots = dir.join("roots.pem");
        std::fs::write(&roots, roots_ca.pem().trim_end()).unwrap();
        let ca = PodCa::generate(Some("p"), DEFAULT_CA_LIFETIME).unwrap();
        let out = dir.join("out/nested");
        publish_bundle(&out, ca.pem(), &roots).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("ca.crt")).unwrap(), ca.pem());
        let bundle = std::fs::read_to_string(out.join("bundle.crt")).unwrap();
        assert_eq!(der(&bundle), [der(roots_ca.pem()), der(ca.pem())].concat());
        for f in ["ca.crt", "bundle.crt"] {
            let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "{f}");
        }
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
        // Publishing again replaces both.
        let ca2 = PodCa::generate(Some("p"), DEFAULT_CA_LIFETIME).unwrap();
        publish_bundle(&out, ca2.pem(), &roots).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("ca.crt")).unwrap(), ca2.pem());

        // Roots that are no certificates, and a directory that is a file.
        std::fs::write(dir.join("empty.pem"), "nothing here\n").unwrap();
        let e = publish_bundle(&out, ca.pem(), &dir.join("empty.pem")).unwrap_err();
        assert!(e.to_string().contains("--system-roots"), "{e}");
        let e = publish_bundle(&out, ca.pem(), &dir.join("missing.pem")).unwrap_err();
        assert!(e.to_string().contains("cannot read the system roots"), "{e}");
        let e = publish_bundle(&roots, ca.pem(), &roots).unwrap_err();
        assert!(e.to_string().contains("--ca-bundle-dir"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn interceptor(egress: serde_json::Value, max_names: usize) -> Interceptor {
        Interceptor::new(
            PodCa::generate(None, DEFAULT_CA_LIFETIME).unwrap(),
            InterceptConfig {
                leaf_lifetime: DEFAULT_LEAF_LIFETIME,
                max_names,
            },
            policies(egress),
            Arc::default(),
        )
    }

    #[test]
    fn names_are_decided_by_the_policies_in_force() {
        let i = interceptor(
            serde_json::json!([
                {"host": "*.example.com", "port": 443},
                {"host": "pinned.example.com", "port": 443, "tlsMode": "Passthrough"},
                {"host": "mandate-no-sni", "port": 443},
            ]),
            8,
        );
        assert_eq!(
            i.decide("api.example.com"),
            Ok(LeafSubject::Dns("api.example.com".into()))
        );
        assert_eq!(
            i.decide("API.example.com."),
            Ok(LeafSubject::Dns("api.example.com".into()))
        );
        assert_eq!(i.decide("pinned.example.com"), Err(Refusal::Passthrough));
        assert_eq!(i.decide("other.example"), Err(Refusal::Undeclared));
        assert_eq!(i.decide("example.com"), Err(Refusal::Undeclared));
        assert_eq!(i.decide(NO_SNI_NAME), Err(Refusal::NoSni), "refused even when declared");
        assert_eq!(i.decide("*.example.com"), Err(Refusal::Malformed));
        assert_eq!(i.decide("a b.example.com"), Err(Refusal::Malformed));
    }

    #[test]
    fn refusals_are_logged_at_most_so_many_a_minute() {
        let i = interceptor(serde_json::json!([]), 1);
        let logged = (0..REFUSAL_LINES_PER_MINUTE + 50)
            .filter(|_| i.may_log_refusal())
            .count();
        assert_eq!(logged, REFUSAL_LINES_PER_MINUTE as usize);
    }

    #[test]
    fn the_cache_is_bounded_least_recently_used_first_and_shared() {
        let i = interceptor(serde_json::json!([{"host": "*.example.com", "port": 443}]), 2);
        let mut changes = i.subscribe_changes();
        let s = |n: &str| LeafSubject::Dns(format!("{n}.example.com"));
        let (a_slot, a) = i.acquire(&s("a")).unwrap();
        let (b_slot, _) = i.acquire(&s("b")).unwrap();
        // A second holder of a shares its leaf and makes it the most recent.
        let (a_slot2, a2) = i.acquire(&s("a")).unwrap();
        assert_eq!(a_slot, a_slot2);
        assert!(Arc::ptr_eq(&a, &a2));
        assert!(!changes.has_changed().unwrap());
        // A third name evicts b, the least recently taken.
        let (c_slot, _) = i.acquire(&s("c")).unwrap();
        assert!(changes.has_changed().unwrap(), "an eviction tells the streams");
        changes.mark_unchanged();
        assert_eq!(i.live(), 2);
        assert!(i.current("b.example.com", b_slot).is_none());
        assert!(i.current("a.example.com", a_slot).is_some());
        // b again: a new slot (its old holder sees its slot gone), evicting
        // a, now the least recently taken.
        let (b_slot2, _) = i.acquire(&s("b")).unwrap();
        assert_ne!(b_slot, b_slot2);
        assert!(i.current("a.example.com", a_slot).is_none());
        assert!(i.current("c.example.com", c_slot).is_some());
        // Releasing a stale slot does nothing; the last holder drops the leaf.
        i.release("b.example.com", b_slot);
        assert!(i.current("b.example.com", b_slot2).is_some());
        let (c_slot2, _) = i.acquire(&s("c")).unwrap();
        assert_eq!(c_slot, c_slot2);
        i.release("c.example.com", c_slot);
        assert!(i.current("c.example.com", c_slot).is_some(), "one holder left");
        i.release("c.example.com", c_slot);
        assert!(i.current("c.example.com", c_slot).is_none());
        assert_eq!(i.live(), 1);
    }

    #[test]
    fn leaves_past_half_life_are_renewed_in_their_slot() {
        let i = Interceptor::new(
            PodCa::generate(None, DEFAULT_CA_LIFETIME).unwrap(),
            InterceptConfig {
                leaf_lifetime: Duration::from_millis(400),
                max_names: 4,
            },
            policies(serde_json::json!([{"host": "a.example", "port": 443}])),
            Arc::default(),
        );
        let (slot, first) = i.acquire(&LeafSubject::Dns("a.example".into())).unwrap();
        assert!(!i.renew_due(), "not yet due");
        // Due at 200 ms: wait for it (with a deadline).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !i.renew_due() {
            assert!(std::time::Instant::now() < deadline, "never renewed");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(first.renew_at() <= SystemTime::now());
        let renewed = i.current("a.example", slot).unwrap();
        assert_ne!(renewed.serial, first.serial);
        assert!(renewed.not_after > first.not_after);
    }
}
