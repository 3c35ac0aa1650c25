//! The reconcilers: AgentPolicy (compile, version, conditions, events) and
//! AgentIdentity (SPIFFE ID, bound pods, conditions).

use mandate_api::names::{ENFORCE_LABEL, INJECTED_ANNOTATION};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::admin::Metrics;
use crate::error::{Error, Result};
use crate::lenient::Lenient;
use mandate_api::crd::{AgentIdentity, AgentIdentityStatus, AgentPolicy, AgentPolicySpec, AgentPolicyStatus};
use mandate_core::binding;
use mandate_core::conditions::{condition, is_true};
use mandate_core::selector::Selector;
use mandate_core::spiffe_id as identity;
use mandate_policy as policy;

/// Longest compile + tests of one policy may take.
pub const COMPILE_DEADLINE: Duration = Duration::from_secs(30);

/// Identities are recounted at least this often, whatever pod events were missed.
pub const RECOUNT_EVERY: Duration = Duration::from_secs(60);

/// Field manager of the operator's server-side applies.
pub const MANAGER: &str = "mandate-operator";

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub trust_domain: String,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Sidecars not (yet) running the version in force, per policy.
    stale: Mutex<HashMap<String, i32>>,
    /// Selected pods Mandate does not mediate, per identity.
    unmediated: Mutex<HashMap<String, usize>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl Context {
    /// Record a policy's stale sidecars; the gauge is the total.
    pub fn stale_sidecars(&self, policy: &str, stale: i32) {
        if let Ok(mut m) = self.stale.lock() {
            m.insert(policy.to_string(), stale.max(0));
            self.metrics.stale_sidecars.set(i64::from(m.values().sum::<i32>()));
        }
    }

    /// Set the identity's posture gauges (held credentials, broad RBAC
    /// findings, unbrokered destinations).
    pub fn posture(&self, ns: &str, identity: &str, p: &mandate_api::crd::AgentPosture) {
        let unbrokered = p.egress.iter().filter(|e| !e.brokered).count();
        for (kind, n) in [
            ("held_credentials", p.held_credentials.len()),
            ("broad_rbac", p.broad_rbac.len()),
            ("unbrokered_hosts", unbrokered),
        ] {
            self.metrics
                .agent_posture
                .get_or_create(&crate::admin::PostureLabels {
                    namespace: ns.to_string(),
                    identity: identity.to_string(),
                    kind,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn unmediated(&self, identity: &str, pods: usize) {
        if let Ok(mut m) = self.unmediated.lock() {
            m.insert(identity.to_string(), pods);
            let total = m.values().sum::<usize>();
            self.metrics
                .unmediated_pods
                .set(i64::try_from(total).unwrap_or(i64::MAX));
        }
    }

    pub fn new(client: Client, metrics: Arc<Metrics>, trust_domain: String, instance: String) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            stale: Mutex::default(),
            unmediated: Mutex::default(),
            client,
            metrics,
            trust_domain,
            failures: Mutex::default(),
        }
    }

    fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// 1 s, 2 s, 4 s, ... up to 5 minutes.
    fn backoff(&self, key: &str) -> Duration {
        let n = match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 8,
        };
        Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300))
    }
}

fn key<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Run one reconcile: count it by outcome, time it, and reset the object's
/// backoff when it succeeds.
async fn measured<K: Resource>(
    kind: &'static str,
    obj: &K,
    ctx: &Context,
    work: impl std::future::Future<Output = Result<Action>>,
) -> Result<Action> {
    let started = Instant::now();
    let result = work.await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.metric_label(),
    };
    ctx.metrics.observe(kind, outcome, started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&key(obj));
    }
    result
}

/// Server-side apply of `status` to the object `name` of kind `K`.
async fn apply_status<K>(api: &Api<K>, name: &str, status: serde_json::Value) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

// ---------------------------------------------------------------- AgentPolicy

/// Compile the policy and write what came of it.
pub async fn reconcile_policy(obj: Arc<Lenient<AgentPolicy>>, ctx: Arc<Context>) -> Result<Action> {
    let work = async {
        match &obj.parsed {
            Ok(policy) => reconcile_policy_inner(policy, &ctx).await,
            Err(why) => unreadable(obj.as_ref(), why, &ctx).await,
        }
    };
    measured("AgentPolicy", obj.as_ref(), &ctx, work).await
}

async fn reconcile_policy_inner(obj: &AgentPolicy, ctx: &Context) -> Result<Action> {
    let ns = obj.namespace().ok_or_else(|| Error::NotNamespaced(obj.name_any()))?;
    let name = obj.name_any();
    let generation = obj.metadata.generation;
    let previous = obj.status.clone().unwrap_or_default();
    // Compile, then run the policy's tests: a version is Ready only when both pass.
    // Off the async workers (the compiler is CPU-bound), under one deadline.
    let spec = obj.spec.clone();
    let work = tokio::task::spawn_blocking(move || {
        let compiled = policy::compile(&spec);
        let tested = match &compiled {
            Ok(_) => policy::run_tests(&spec).map(|report| {
                if report.all_passed() {
                    Ok(report.summary())
                } else {
                    Err(report.summary())
                }
            }),
            Err(e) => Err(e.clone()),
        };
        (compiled, tested)
    });
    let (compiled, tested) = match tokio::time::timeout(COMPILE_DEADLINE, work).await {
        Ok(Ok(done)) => done,
        Ok(Err(join)) => {
            let e = policy::PolicyError::Rego(format!("the compiler failed: {join}"));
            (Err(e.clone()), Err(e))
        }
        Err(_) => {
            let e = policy::PolicyError::Rego(format!("compiling and testing took longer than {COMPILE_DEADLINE:?}"));
            (Err(e.clone()), Err(e))
        }
    };
    let outcome: std::result::Result<&policy::Compiled, policy::PolicyError> = match (&compiled, &tested) {
        (Ok(c), Ok(Ok(_))) => Ok(c),
        (Err(e), _) => Err(e.clone()),
        (Ok(_), Ok(Err(summary))) => Err(policy::PolicyError::TestsFailed(summary.clone())),
        (Ok(_), Err(e)) => Err(e.clone()),
    };
    let compiled_cond = match &compiled {
        Ok(c) => condition(
            &previous.conditions,
            "Compiled",
            true,
            "Compiled",
            format!(
                "{} module(s) compiled; packages: {}",
                obj.spec.modules.len(),
                c.packages.join(", ")
            ),
            generation,
        ),
        Err(e) => condition(
            &previous.conditions,
            "Compiled",
            false,
            e.reason(),
            e.to_string(),
            generation,
        ),
    };
    let tested_cond = match (&compiled, &tested) {
        (Err(_), _) => condition(
            &previous.conditions,
            "Tested",
            false,
            "NotCompiled",
            "not run: the policy does not compile",
            generation,
        ),
        (Ok(_), Ok(Ok(summary))) => condition(
            &previous.conditions,
            "Tested",
            true,
            "TestsPassed",
            summary.clone(),
            generation,
        ),
        (Ok(_), Ok(Err(summary))) => condition(
            &previous.conditions,
            "Tested",
            false,
            "TestsFailed",
            summary.clone(),
            generation,
        ),
        (Ok(_), Err(e)) => condition(
            &previous.conditions,
            "Tested",
            false,
            e.reason(),
            e.to_string(),
            generation,
        ),
    };

    let status = match &outcome {
        Ok(c) => AgentPolicyStatus {
            observed_generation: generation,
            short_version: c.version.strip_prefix("sha256:").map(|h| h.chars().take(12).collect()),
            version: Some(c.version.clone()),
            last_good_spec: serde_json::to_value(&obj.spec).ok(),
            conditions: vec![
                compiled_cond,
                tested_cond,
                condition(
                    &previous.conditions,
                    "Ready",
                    true,
                    "Ready",
                    format!("version {} is ready to enforce", c.version),
                    generation,
                ),
            ],
            ..AgentPolicyStatus::default()
        },
        Err(e) => {
            // The last good version stays in force; status says why the new one is not.
            let kept = match &previous.version {
                Some(v) => format!("the last good version {v} stays in force"),
                None => "no version of this policy has been ready yet; the agents it binds are denied".to_string(),
            };
            let why = if matches!(e, policy::PolicyError::TestsFailed(_)) {
                "fails its tests"
            } else {
                "does not compile"
            };
            AgentPolicyStatus {
                observed_generation: generation,
                version: previous.version.clone(),
                short_version: previous.short_version.clone(),
                last_good_spec: previous.last_good_spec.clone(),
                conditions: vec![
                    compiled_cond,
                    tested_cond,
                    condition(
                        &previous.conditions,
                        "Ready",
                        false,
                        if matches!(e, policy::PolicyError::TestsFailed(_)) {
                            "TestsFailed"
                        } else {
                            "CompileFailed"
                        },
                        format!("generation {} {why}; {kept}", generation.unwrap_or_default()),
                        generation,
                    ),
                ],
                ..AgentPolicyStatus::default()
            }
        }
    };
    let compiled = outcome;

    // An event when the outcome for this generation is new, not on every resync.
    let changed = previous.observed_generation != generation
        || is_true(&previous.conditions, "Ready") != compiled.is_ok()
        || previous.conditions.is_empty();
    if changed {
        let event = match &compiled {
            Ok(c) => Event {
                type_: EventType::Normal,
                reason: "Compiled".into(),
                note: Some(format!("compiled to version {}", c.version)),
                action: "Compile".into(),
                secondary: None,
            },
            Err(e) => Event {
                type_: EventType::Warning,
                reason: if matches!(e, policy::PolicyError::TestsFailed(_)) {
                    "TestsFailed"
                } else {
                    "CompileFailed"
                }
                .into(),
                note: Some(mandate_core::conditions::truncate(e.to_string(), 1000)),
                action: "Compile".into(),
                secondary: None,
            },
        };
        if let Err(err) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
            // An event is a courtesy; the status below is the record.
            tracing::warn!(policy = %key(obj), %err, "could not publish event");
        }
    }

    // How many bound sidecars report running the version in force.
    let mut status = status;
    if let Some(version) = status.version.clone() {
        let (bound, in_force) = sidecars_in_force(ctx, &ns, &name, &obj.spec, &version).await?;
        status.bound_sidecars = Some(bound);
        status.sidecars_in_force = Some(in_force);
        status.in_force = Some(format!("{in_force}/{bound}"));
        ctx.stale_sidecars(&format!("{ns}/{name}"), bound - in_force);
    }

    let api: Api<AgentPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    apply_status(&api, &name, serde_json::to_value(&status)?).await?;
    match &compiled {
        Ok(c) => tracing::info!(policy = %key(obj), version = %c.version, "policy ready"),
        Err(e) => tracing::warn!(policy = %key(obj), reason = e.reason(), error = %e, "policy not ready"),
    }
    Ok(Action::await_change())
}

// ---------------------------------------------------------------- AgentIdentity

/// Resolve the SPIFFE ID, count the bound pods, write what came of it.
pub async fn reconcile_identity(obj: Arc<Lenient<AgentIdentity>>, ctx: Arc<Context>) -> Result<Action> {
    let work = async {
        match &obj.parsed {
            Ok(identity) => reconcile_identity_inner(identity, &ctx).await,
            Err(why) => unreadable(obj.as_ref(), why, &ctx).await,
        }
    };
    measured("AgentIdentity", obj.as_ref(), &ctx, work).await
}

async fn reconcile_identity_inner(obj: &AgentIdentity, ctx: &Context) -> Result<Action> {
    let ns = obj.namespace().ok_or_else(|| Error::NotNamespaced(obj.name_any()))?;
    let name = obj.name_any();
    let generation = obj.metadata.generation;
    let previous = obj.status.clone().unwrap_or_default();

    let spiffe = identity::spiffe_id(obj.spec.spiffe_id_template.as_deref(), &ctx.trust_domain, &ns, &name);
    let selector = Selector::try_from(&obj.spec.selector);
    // An ID two identities resolve to belongs to neither: the signer and the
    // policy stream refuse it, so the status says so too.
    let clash = match &spiffe {
        Ok(id) => {
            let others = Api::<Lenient<AgentIdentity>>::namespaced(ctx.client.clone(), &ns)
                .list(&ListParams::default())
                .await?;
            let mut sharing: Vec<String> = others
                .items
                .iter()
                .filter(|o| o.name_any() != name)
                .filter_map(|o| {
                    let spec = &o.parsed.as_ref().ok()?.spec;
                    let theirs = identity::spiffe_id(
                        spec.spiffe_id_template.as_deref(),
                        &ctx.trust_domain,
                        &ns,
                        &o.name_any(),
                    )
                    .ok()?;
                    (theirs == *id).then(|| o.name_any())
                })
                .collect();
            sharing.sort();
            (!sharing.is_empty()).then(|| {
                format!(
                    "AgentIdentity {} in {ns} resolves to {id} too: a SPIFFE ID names one agent, so neither gets SVIDs or policies; give each its own spec.spiffeIdTemplate (with {{name}})",
                    sharing.join(", ")
                )
            })
        }
        Err(_) => None,
    };
    let mut unmediated: Vec<(String, &'static str)> = Vec::new();
    let mut posture: Option<mandate_api::crd::AgentPosture> = None;
    let (bound_pods, problem) = match (&spiffe, &selector) {
        (Err(e), _) => (previous.bound_pods, Some(("InvalidSpiffeId", e.to_string()))),
        (_, Err(e)) => (0, Some(("InvalidSelector", format!("spec.selector: {e}")))),
        _ if clash.is_some() => (0, clash.map(|c| ("DuplicateSpiffeId", c))),
        (Ok(_), Ok(sel)) if sel.selects_by_absence() => (
            0,
            Some(("InvalidSelector", mandate_api::crd::SELECTS_BY_ABSENCE.into())),
        ),
        (Ok(_), Ok(sel)) => {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let list = pods.list(&ListParams::default().labels(&sel.to_string())).await?;
            let enforced = Api::<Namespace>::all(ctx.client.clone())
                .get_opt(&ns)
                .await?
                .is_some_and(|n| n.labels().get(ENFORCE_LABEL).map(String::as_str) == Some("true"));
            let mut bound = 0i32;
            for p in &list.items {
                let finished = p.metadata.deletion_timestamp.is_some()
                    || p.status
                        .as_ref()
                        .and_then(|s| s.phase.as_deref())
                        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
                if finished {
                    continue;
                }
                let injected = p.annotations().contains_key(INJECTED_ANNOTATION);
                match (enforced, injected) {
                    (true, true) => bound = bound.saturating_add(1),
                    (false, _) => unmediated.push((p.name_any(), "its namespace is not enforced")),
                    (true, false) => unmediated.push((p.name_any(), "never injected")),
                }
            }
            unmediated.sort();
            posture = Some(agent_posture(ctx, &ns, &name, &list.items).await?);
            (bound, None)
        }
    };
    let ready = condition(
        &previous.conditions,
        "Ready",
        problem.is_none(),
        problem.as_ref().map_or("Resolved", |(r, _)| r),
        match (&problem, &spiffe) {
            (Some((_, msg)), _) => msg.clone(),
            (None, Ok(id)) => format!("{id}; {bound_pods} pod(s) bound"),
            (None, Err(e)) => e.to_string(),
        },
        generation,
    );
    // A problem is also an Event, once per change of it (the status is
    // recomputed every minute): an identity written before a rule existed
    // (a SPIFFE ID outside its namespace, say) binds nothing until fixed.
    let was = previous.conditions.iter().find(|c| c.type_ == "Ready");
    if let Some((reason, message)) = &problem
        && was.is_none_or(|c| c.reason != *reason || c.message != ready.message)
    {
        let event = Event {
            type_: EventType::Warning,
            reason: (*reason).into(),
            note: Some(mandate_core::conditions::truncate(
                format!("{message}; this identity's pods get no SVID and no policies until it is fixed"),
                1000,
            )),
            action: "Resolve".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(identity = %format!("{ns}/{name}"), %err, "could not publish event");
        }
    }
    let mediated = mediated_condition(&previous.conditions, &unmediated, generation);
    if !unmediated.is_empty() {
        let was = previous.conditions.iter().find(|c| c.type_ == "Mediated");
        if was.is_none_or(|c| c.status != mediated.status || c.message != mediated.message) {
            let event = Event {
                type_: EventType::Warning,
                reason: mediated.reason.clone(),
                note: Some(mandate_core::conditions::truncate(mediated.message.clone(), 1000)),
                action: "Mediate".into(),
                secondary: None,
            };
            if let Err(err) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
                tracing::warn!(identity = %format!("{ns}/{name}"), %err, "could not publish event");
            }
        }
        tracing::warn!(identity = %format!("{ns}/{name}"), pods = unmediated.len(), "{}", mediated.message);
    }
    ctx.unmediated(&format!("{ns}/{name}"), unmediated.len());
    let status = AgentIdentityStatus {
        observed_generation: generation,
        spiffe_id: spiffe.ok(),
        bound_pods,
        unmediated_pods: i32::try_from(unmediated.len()).unwrap_or(i32::MAX),
        unmediated: unmediated.iter().take(20).map(|(p, _)| p.clone()).collect(),
        conditions: vec![ready, mediated],
        // Written by the CA (its own field manager); left alone here.
        svids: Vec::new(),
        // Written by the policy service on each ack (its own field manager).
        sidecars: Vec::new(),
        posture,
    };
    let api: Api<AgentIdentity> = Api::namespaced(ctx.client.clone(), &ns);
    apply_status(&api, &name, serde_json::to_value(&status)?).await?;
    // Pod events map a pod to the identities its *current* labels match; a
    // pod relabelled away, or deleted during a watch gap, is caught here.
    Ok(Action::requeue(RECOUNT_EVERY))
}

/// The credentials the identity's running pods hold, how broad their
/// service accounts' RBAC is, and the destinations its policies declare,
/// brokered or not (see [`crate::posture`]). A service account that cannot
/// be read counts as automounting (Kubernetes' default).
async fn agent_posture(
    ctx: &Context,
    ns: &str,
    identity: &str,
    pods: &[Pod],
) -> Result<mandate_api::crd::AgentPosture> {
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    let mut held = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for p in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
        let sa_name = p
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let sa = accounts.get_opt(&sa_name).await.ok().flatten();
        held.extend(crate::posture::held_credentials(p, sa.as_ref()));
        names.push(sa_name);
    }
    held.sort();
    held.dedup();
    names.sort();
    names.dedup();
    let mut rbac = Vec::new();
    for sa in &names {
        for what in crate::posture::broad_rbac(&ctx.client, ns, sa).await {
            rbac.push(format!("{sa}: {what}"));
        }
    }
    let policies = Api::<Lenient<AgentPolicy>>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let bound: Vec<&AgentPolicySpec> = policies
        .items
        .iter()
        .filter_map(|p| p.parsed.as_ref().ok())
        .map(|p| &p.spec)
        .filter(|spec| {
            spec.identities.iter().any(|i| i == identity)
                || live
                    .iter()
                    .any(|pod| mandate_core::binding::policy_binds(spec, Some(identity), pod.labels()))
        })
        .collect();
    let egress = crate::posture::egress(&bound);
    let posture = mandate_api::crd::AgentPosture {
        held_credentials: held,
        broad_rbac: rbac,
        egress,
    };
    ctx.posture(ns, identity, &posture);
    Ok(posture)
}

/// `Mediated`: whether every pod the identity selects is mediated, and if
/// not, which are not and why.
fn mediated_condition(
    previous: &[mandate_api::meta::Condition],
    unmediated: &[(String, &'static str)],
    generation: Option<i64>,
) -> mandate_api::meta::Condition {
    let (reason, message) = match unmediated {
        [] => (
            "AllInjected",
            "every selected pod runs Mandate's proxy and sidecar".to_string(),
        ),
        [(_, why), ..] => {
            let shown: Vec<String> = unmediated.iter().take(5).map(|(p, w)| format!("{p} ({w})")).collect();
            let more = unmediated.len().saturating_sub(shown.len());
            (
                if *why == "never injected" {
                    "PodsNotInjected"
                } else {
                    "NamespaceNotEnforced"
                },
                format!(
                    "{} selected pod(s) run with no proxy and no decision: {}{}; they are not counted as bound. Label the namespace {ENFORCE_LABEL}=true and re-create them so that they are injected",
                    unmediated.len(),
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            )
        }
    };
    condition(previous, "Mediated", unmediated.is_empty(), reason, message, generation)
}

/// `(bound, in force)`: injected pods this policy binds (through the
/// identities it names or its agentSelector), and how many of their
/// sidecars acknowledged a set with `version` of it. Acks are read from the
/// AgentIdentities' `status.sidecars` (written only by the operator, from
/// the set it sent), and count only for an existing pod with the same uid
/// that the acknowledging identity still selects; pod annotations count
/// for nothing.
async fn sidecars_in_force(
    ctx: &Context,
    ns: &str,
    name: &str,
    spec: &mandate_api::crd::AgentPolicySpec,
    version: &str,
) -> Result<(i32, i32)> {
    // Only this policy's agents are read: the pods of each selector
    // (filtered by the apiserver), never the whole namespace's pods (a
    // reconcile per policy must not cost a list of everything). The
    // namespace's identities are few, and hold the acks.
    let identities: Vec<AgentIdentity> = Api::<Lenient<AgentIdentity>>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|i| i.parsed.ok())
        .collect();
    let mut selectors: Vec<Selector> = Vec::new();
    for id in &spec.identities {
        if let Some(i) = identities.iter().find(|i| i.name_any() == *id)
            && let Ok(sel) = Selector::try_from(&i.spec.selector)
        {
            selectors.push(sel);
        }
    }
    selectors.extend(spec.agent_selector.as_ref().and_then(|s| Selector::try_from(s).ok()));
    selectors.retain(|s| !s.selects_all());
    let pod_api = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let mut pods = std::collections::BTreeMap::new();
    for sel in &selectors {
        for p in pod_api
            .list_metadata(&ListParams::default().labels(&sel.to_string()))
            .await?
            .items
        {
            pods.insert(p.metadata.name.clone().unwrap_or_default(), p);
        }
    }
    let want = format!("{ns}/{name}={version}");
    let (mut bound, mut in_force) = (0, 0);
    for pod in pods.values() {
        let injected = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(mandate_api::names::INJECTED_ANNOTATION));
        if !injected || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        bound += 1;
        let (Some(pod_name), Some(uid)) = (pod.metadata.name.as_deref(), pod.metadata.uid.as_deref()) else {
            continue;
        };
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let runs = identities
            .iter()
            .filter(|i| binding::selects(&i.spec.selector, &labels))
            .flat_map(|i| i.status.iter().flat_map(|s| s.sidecars.iter()))
            .any(|e| e.pod == pod_name && e.pod_uid == uid && e.in_force.contains(&want));
        if runs {
            in_force += 1;
        }
    }
    Ok((bound, in_force))
}

/// Identities in `pod`'s namespace whose selector matches its labels.
fn identities_selecting(store: &[Arc<Lenient<AgentIdentity>>], pod: &Pod) -> Vec<ObjectRef<Lenient<AgentIdentity>>> {
    let labels = pod.labels();
    store
        .iter()
        .filter(|i| i.namespace() == pod.namespace())
        .filter(|i| {
            i.parsed
                .as_ref()
                .is_ok_and(|i| binding::selects(&i.spec.selector, labels))
        })
        .map(|i| ObjectRef::from_obj(i.as_ref()))
        .collect()
}

/// An object that does not parse: say so in the log and in an event, and
/// leave it until it changes. Its kind's other objects reconcile as usual.
async fn unreadable<K: Resource<DynamicType = ()>>(obj: &Lenient<K>, why: &str, ctx: &Context) -> Result<Action> {
    tracing::error!(object = %key(obj), error = %why, "cannot read this object; skipping it until it changes");
    let event = Event {
        type_: EventType::Warning,
        reason: "Unreadable".into(),
        note: Some(mandate_core::conditions::truncate(
            format!("the operator cannot read this object: {why}"),
            1000,
        )),
        action: "Read".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(object = %key(obj), %err, "could not publish event");
    }
    Ok(Action::await_change())
}

// ---------------------------------------------------------------- running

fn error_policy<K: Resource>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&key(obj.as_ref()));
    tracing::warn!(object = %key(obj.as_ref()), %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Run both controllers until `shutdown` resolves. `namespace` limits them to
/// one namespace (None: all).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, shutdown: impl Future<Output = ()> + Send + 'static) {
    let client = ctx.client.clone();
    type Policies = Api<Lenient<AgentPolicy>>;
    type Identities = Api<Lenient<AgentIdentity>>;
    let (policies, identities, pods): (Policies, Identities, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    // Watched as Lenient<K>: an object that does not parse is one reconcile
    // that reports it (see `unreadable`), not a failed list for every object.
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut stop_a = stop_tx.subscribe();
    let mut stop_b = stop_tx.subscribe();
    let mut stop_early = stop_tx.subscribe();

    // The controllers' caches hold slimmed objects (see `lenient::slim_meta`).
    let (policy_reader, policy_writer) = reflector::store();
    let policies_ready = policy_reader.clone();
    let policy_objects = reflector::reflector(
        policy_writer,
        watcher(policies, watcher::Config::default())
            .default_backoff()
            .modify(Lenient::slim),
    )
    .applied_objects();
    let policy_ctl = Controller::for_stream(policy_objects, policy_reader);
    let policy_store = policy_ctl.store();
    let policy_store_b = policy_store.clone();
    // A pod's change (a new or gone agent) and an identity's (an ack in its
    // status) recount the policies of its namespace.
    let policy_ctl = policy_ctl
        .watches(pods.clone(), watcher::Config::default(), move |pod: Pod| {
            policy_store
                .state()
                .iter()
                .filter(|p| p.namespace() == pod.namespace())
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches(
            identities.clone(),
            watcher::Config::default(),
            move |identity: Lenient<AgentIdentity>| {
                policy_store_b
                    .state()
                    .iter()
                    .filter(|p| p.namespace() == identity.namespace())
                    .map(|p| ObjectRef::from_obj(p.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(async move {
            let _ = stop_a.recv().await;
        })
        .run(reconcile_policy, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "AgentPolicy controller");
            }
        });

    let (identity_reader, identity_writer) = reflector::store();
    let identities_ready = identity_reader.clone();
    let identity_objects = reflector::reflector(
        identity_writer,
        watcher(identities, watcher::Config::default())
            .default_backoff()
            .modify(Lenient::slim),
    )
    .applied_objects();
    let identity_ctl = Controller::for_stream(identity_objects, identity_reader);
    let store = identity_ctl.store();
    // Map each pod event to the identities in its namespace that select it.
    let identity_ctl = identity_ctl
        .watches(pods, watcher::Config::default(), move |pod: Pod| {
            identities_selecting(&store.state(), &pod)
        })
        .graceful_shutdown_on(async move {
            let _ = stop_b.recv().await;
        })
        .run(reconcile_identity, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "AgentIdentity controller");
            }
        });

    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(());
    });
    // A stop before both caches are ready: no reconcile can be in flight, and
    // kube-runtime's graceful shutdown would wait for a store that is no
    // longer filled (so the lease would not be handed over). Return at once.
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn({
        let started = started.clone();
        async move {
            if policies_ready.wait_until_ready().await.is_ok() && identities_ready.wait_until_ready().await.is_ok() {
                started.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let stopped_before_start = async move {
        let _ = stop_early.recv().await;
        if started.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = futures::future::join(policy_ctl, identity_ctl) => {}
        () = stopped_before_start => tracing::info!("stopped before the controllers' caches were ready"),
    }
}
