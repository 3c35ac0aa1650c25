//! The admin port: `/livez`, `/readyz`, `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of reconcile metrics: the kind and the outcome, both from small fixed sets.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

/// Labels of the reconcile duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Labels of admission metrics: which webhook, and allowed | patched | denied.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub webhook: &'static str,
    pub result: &'static str,
}

/// Labels of the admission latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub webhook: &'static str,
}

/// Labels of the ack counter: recorded | refused | failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AckLabels {
    pub result: &'static str,
}

/// Labels of the webhook drift gauge: a configuration Mandate serves and one
/// of its webhooks (`-`: the configuration itself). Bounded: a handful.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    /// `mutating` or `validating`.
    pub kind: &'static str,
    pub configuration: String,
    pub webhook: String,
}

/// Labels of the posture gauge: one AgentIdentity and what is counted
/// (`held_credentials`, `broad_rbac`, `unbrokered_hosts`). The one metric
/// whose labels name objects: one series per identity and kind, as many as
/// there are agents.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PostureLabels {
    pub namespace: String,
    pub identity: String,
    pub kind: &'static str,
}

/// The operator's metrics. Labels never carry object names (unbounded
/// series), but for the posture gauge, per agent by design.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_seconds: Family<KindLabels, Histogram>,
    pub leader: Gauge,
    pub admissions: Family<AdmissionLabels, Counter>,
    pub admission_seconds: Family<WebhookLabels, Histogram>,
    pub stale_sidecars: Gauge,
    pub unmediated_pods: Gauge,
    pub policy_streams: Gauge,
    pub acks: Family<AckLabels, Counter>,
    pub webhook_drift: Family<DriftLabels, Gauge>,
    pub agent_posture: Family<PostureLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mandate_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciliations by kind and result (ok, or the error's class; a policy that does not compile is ok: that is its status)",
            reconciles.clone(),
        );
        let reconcile_seconds = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time to reconcile one object",
            reconcile_seconds.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and runs the reconcilers",
            leader.clone(),
        );
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission requests answered, by webhook and result (allowed, patched, denied)",
            admissions.clone(),
        );
        let admission_seconds = Family::<WebhookLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        registry.register(
            "admission_duration_seconds",
            "Time to answer one admission request",
            admission_seconds.clone(),
        );
        let stale_sidecars = Gauge::default();
        registry.register(
            "stale_sidecars",
            "Bound sidecars not reporting the policy version in force, summed over policies (leader only)",
            stale_sidecars.clone(),
        );
        let unmediated_pods = Gauge::default();
        registry.register(
            "unmediated_pods",
            "Pods an AgentIdentity selects that Mandate does not mediate (never injected, or in a namespace not enforced), summed over identities (leader only)",
            unmediated_pods.clone(),
        );
        let policy_streams = Gauge::default();
        registry.register(
            "policy_streams",
            "Sidecars subscribed to this replica's policy stream",
            policy_streams.clone(),
        );
        let acks = Family::<AckLabels, Counter>::default();
        registry.register(
            "acks",
            "Sidecars' acks of a policy set, by result: recorded, refused (not a set this replica sent that pod on that connection), failed (could not be written)",
            acks.clone(),
        );
        let webhook_drift = Family::<DriftLabels, Gauge>::default();
        registry.register(
            "webhook_drift",
            "1 while a webhook mediation relies on is missing or weakened in its configuration (deleted, set to Ignore, rules narrowed, an objectSelector, enforced namespaces not selected); see the WebhookDrift events",
            webhook_drift.clone(),
        );
        let agent_posture = Family::<PostureLabels, Gauge>::default();
        registry.register(
            "agent_posture",
            "Per AgentIdentity (leader only): long-lived credentials its pods hold (kind=held_credentials), broad RBAC findings of its service accounts (broad_rbac), destinations its policies declare with no brokered credential (unbrokered_hosts); see its status.posture",
            agent_posture.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_seconds,
            leader,
            admissions,
            admission_seconds,
            stale_sidecars,
            unmediated_pods,
            policy_streams,
            acks,
            webhook_drift,
            agent_posture,
        }
    }
}

impl Metrics {
    pub fn observe_admission(&self, webhook: &'static str, result: &'static str, elapsed: Duration) {
        self.admissions
            .get_or_create(&AdmissionLabels { webhook, result })
            .inc();
        self.admission_seconds
            .get_or_create(&WebhookLabels { webhook })
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe(&self, kind: &'static str, result: &'static str, elapsed: Duration) {
        self.reconciles.get_or_create(&ReconcileLabels { kind, result }).inc();
        self.reconcile_seconds
            .get_or_create(&KindLabels { kind })
            .observe(elapsed.as_secs_f64());
    }
}

/// Shared with the handlers.
#[derive(Debug)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once the operator has reached the apiserver and found its CRDs.
    pub ready: AtomicBool,
}

impl mandate_runtime::Health for AdminState {
    fn readiness(&self) -> Result<(), &'static str> {
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("starting (the apiserver or Mandate's CRDs not reachable yet) or stopping")
        }
    }

    fn registry(&self) -> &Registry {
        &self.metrics.registry
    }
}

/// Bind the admin port and serve `/livez`, `/readyz` and `/metrics` until the process ends.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> anyhow::Result<()> {
    Ok(mandate_runtime::serve_admin(addr, mandate_runtime::admin_router(state)).await?)
}
