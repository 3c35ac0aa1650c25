//! The sidecar's metrics and admin endpoints (`/livez`, `/readyz`, `/metrics`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use mandate_policy::engine::{Decision, PolicySet};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// One series per loaded policy (bounded by the policies loaded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
    pub version: String,
    pub mode: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    decisions: Family<ResultLabels, Counter>,
    latency: Histogram,
    policy_info: Family<PolicyLabels, Gauge>,
    pub load_errors: Counter,
    pub ready: AtomicBool,
    /// Whether this sidecar must hold an SVID to be ready (`--svid-server`,
    /// or `--identity-source spire`).
    pub svid_required: AtomicBool,
    /// 1 while the sidecar holds a valid SVID.
    pub svid_valid: Gauge,
    /// When the SVID held expires (Unix seconds; 0 with none).
    pub svid_expiry: Gauge,
    /// SVIDs taken into use (the first and every rotation).
    pub svid_updates: Counter,
    /// DNS queries by result (forwarded, refused, error, malformed).
    dns_queries: Family<ResultLabels, Counter>,
    /// Interception leaves issued, by kind (new, renewal).
    intercept_minted: Family<KindLabels, Counter>,
    /// SDS names refused (sent as removed), by reason.
    intercept_refused: Family<ReasonLabels, Counter>,
    /// Leaves evicted from the bounded cache.
    pub intercept_evicted: Counter,
    /// Names holding a leaf now.
    pub intercept_leaves: Gauge,
    /// When the pod CA expires (Unix seconds; 0 without interception).
    pub intercept_ca_expiry: Gauge,
    /// Allowed requests to a destination that brokers a credential, by what
    /// became of the credential.
    credentials: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mandate_sidecar");
        let decisions = Family::<ResultLabels, Counter>::default();
        registry.register("decisions", "Decisions by result (allow, deny)", decisions.clone());
        let latency = Histogram::new(exponential_buckets(0.000_005, 2.0, 18));
        registry.register(
            "decision_duration_seconds",
            "Time to build the input and evaluate every policy",
            latency.clone(),
        );
        let policy_info = Family::<PolicyLabels, Gauge>::default();
        registry.register("policy_info", "1 for each policy version in force", policy_info.clone());
        let load_errors = Counter::default();
        registry.register(
            "policy_load_errors",
            "Policy files that failed to load (the previous version stays)",
            load_errors.clone(),
        );
        let svid_valid = Gauge::default();
        registry.register(
            "svid_valid",
            "1 while the sidecar holds a valid X.509-SVID (with --svid-server or --identity-source spire)",
            svid_valid.clone(),
        );
        let svid_expiry = Gauge::default();
        registry.register(
            "svid_expiry_timestamp_seconds",
            "When the X.509-SVID held expires, in Unix seconds (0 with none)",
            svid_expiry.clone(),
        );
        let svid_updates = Counter::default();
        registry.register(
            "svid_updates",
            "X.509-SVIDs taken into use (the first and each renewal or rotation)",
            svid_updates.clone(),
        );
        let dns_queries = Family::<ResultLabels, Counter>::default();
        registry.register(
            "dns_queries",
            "DNS queries of the agent by result: forwarded (an allowed name, answered by the upstream), refused (answered here: NXDOMAIN, no records or REFUSED), error (SERVFAIL: no upstream answered; or dropped under load), malformed (not a query, FORMERR, NOTIMP)",
            dns_queries.clone(),
        );
        let intercept_minted = Family::<KindLabels, Counter>::default();
        registry.register(
            "intercept_leaves_minted",
            "TLS interception leaves issued by the pod CA, by kind: new (a name's first), renewal (at half-life)",
            intercept_minted.clone(),
        );
        let intercept_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "intercept_refusals",
            "SDS names refused a leaf (sent to Envoy as removed, so the handshake fails), by reason: undeclared, passthrough, no_sni, malformed, capacity, error (evictions are counted apart)",
            intercept_refused.clone(),
        );
        let intercept_evicted = Counter::default();
        registry.register(
            "intercept_leaves_evicted",
            "TLS interception leaves evicted, least recently used first, to keep within --max-intercepted-names",
            intercept_evicted.clone(),
        );
        let intercept_leaves = Gauge::default();
        registry.register(
            "intercept_leaves",
            "Names holding a TLS interception leaf now",
            intercept_leaves.clone(),
        );
        let intercept_ca_expiry = Gauge::default();
        registry.register(
            "intercept_ca_expiry_timestamp_seconds",
            "When the pod CA expires, in Unix seconds (0 without interception); leaves are refused after it",
            intercept_ca_expiry.clone(),
        );
        let credentials = Family::<ResultLabels, Counter>::default();
        registry.register(
            "credentials_injected",
            "Requests policy allowed to a destination that brokers a credential, by result: injected (added; the agent's own removed), unavailable (no usable value: the request was denied), agent_supplied_denied (the agent sent its own, with agentSupplied: Deny, or where it cannot be removed: denied), not_tls (the upstream leg was plain HTTP: denied), reflecting_method (TRACE or TRACK, which echo the request back: denied)",
            credentials.clone(),
        );
        Self {
            credentials,
            intercept_minted,
            intercept_refused,
            intercept_evicted,
            intercept_leaves,
            intercept_ca_expiry,
            registry,
            decisions,
            latency,
            policy_info,
            load_errors,
            ready: AtomicBool::new(false),
            svid_required: AtomicBool::new(false),
            svid_valid,
            svid_expiry,
            svid_updates,
            dns_queries,
        }
    }
}

impl Metrics {
    /// Record the SVID now held (or none).
    pub fn svid_held(&self, svid: Option<&crate::svid::Svid>) {
        self.svid_valid.set(i64::from(svid.is_some()));
        let expiry = svid
            .and_then(|s| s.expires_at.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.svid_expiry.set(expiry);
        if svid.is_some() {
            self.svid_updates.inc();
        }
    }

    /// Count one interception leaf issued (`new` or `renewal`).
    pub fn intercept_minted(&self, kind: &'static str) {
        self.intercept_minted.get_or_create(&KindLabels { kind }).inc();
    }

    /// Count one SDS name refused, by reason.
    pub fn intercept_refused(&self, reason: &'static str) {
        self.intercept_refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Count what became of one allowed request's brokered credential.
    pub fn credential(&self, result: &'static str) {
        self.credentials.get_or_create(&ResultLabels { result }).inc();
    }

    /// Count one DNS query by its result.
    pub fn dns_query(&self, result: &'static str) {
        self.dns_queries.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn observe(&self, d: &Decision, latency: Duration) {
        let result = if d.allow { "allow" } else { "deny" };
        self.decisions.get_or_create(&ResultLabels { result }).inc();
        self.latency.observe(latency.as_secs_f64());
    }

    /// Record the set in force; ready once it has a policy.
    pub fn policies_loaded(&self, set: &PolicySet) {
        self.policy_info.clear();
        for p in &set.policies {
            let mode = match p.mode {
                mandate_api::crd::PolicyMode::Enforce => "Enforce",
                mandate_api::crd::PolicyMode::DryRun => "DryRun",
            };
            self.policy_info
                .get_or_create(&PolicyLabels {
                    policy: p.name.clone(),
                    version: p.version.clone(),
                    mode,
                })
                .set(1);
        }
        self.ready.store(!set.policies.is_empty(), Ordering::Relaxed);
    }
}

impl mandate_runtime::Health for Metrics {
    fn readiness(&self) -> Result<(), &'static str> {
        if !self.ready.load(Ordering::Relaxed) {
            Err("no policy loaded (every request is denied)")
        } else if self.svid_required.load(Ordering::Relaxed) && self.svid_valid.get() != 1 {
            Err("no valid SVID (every request is denied)")
        } else {
            Ok(())
        }
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// The admin router: `/livez`, `/readyz` and `/metrics`.
pub fn router(m: Arc<Metrics>) -> axum::Router {
    mandate_runtime::admin_router(m)
}
