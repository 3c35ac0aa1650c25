//! `mandate.policy.v1.Policies`, served by every replica over mutual TLS:
//! each sidecar, identified by the SPIFFE ID in its client SVID, receives
//! the complete set of AgentPolicies bound to its AgentIdentity, at once
//! and again on every change. Only specs that compile and pass their tests
//! (checked here again, once per version) are sent; while a policy's newest
//! spec does not, its last good spec (kept in its status) is sent instead,
//! and a policy that never had a good version is named as withheld, which
//! sidecars enforce as deny-all.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mandate_proto::policy::v1::policies_server::Policies;
use mandate_proto::policy::v1::{AckRequest, AckResponse, Policy, PolicySet, SubscribeRequest};
use sha2::Digest as _;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::admin::Metrics;
use crate::lenient::Lenient;
use mandate_api::crd::{AgentIdentity, AgentPolicy, AgentPolicySpec};
use mandate_api::names::IN_FORCE_ANNOTATION;

/// The peer's SPIFFE ID, put into each request by the TLS server.
#[derive(Debug, Clone)]
pub struct PeerSpiffeId(pub String);

/// The distribution service: stores of policies and identities, and a
/// counter bumped on every change of either.
#[derive(Clone)]
pub struct Distributor {
    client: Client,
    trust_domain: String,
    policies: Store<Lenient<AgentPolicy>>,
    identities: Store<Lenient<AgentIdentity>>,
    changed: watch::Receiver<u64>,
    /// version → whether that spec compiles and passes its tests.
    checked: Arc<Mutex<HashMap<String, bool>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Distributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distributor").finish()
    }
}

impl Distributor {
    /// Start the watches and return the service.
    pub fn start(client: Client, trust_domain: String, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let (policies, pw) = reflector::store();
        let (identities, iw) = reflector::store();
        let bump = |tx: Arc<watch::Sender<u64>>| move || tx.send_modify(|n| *n = n.wrapping_add(1));
        let on_policy = bump(tx.clone());
        tokio::spawn(
            reflector::reflector(
                pw,
                watcher(
                    Api::<Lenient<AgentPolicy>>::all(client.clone()),
                    watcher::Config::default(),
                )
                .default_backoff()
                .modify(Lenient::slim),
            )
            .for_each(move |e| {
                match e {
                    Ok(_) => on_policy(),
                    Err(e) => tracing::warn!(error = %e, "AgentPolicy watch (distribution) failed; retrying"),
                }
                async {}
            }),
        );
        let on_identity = bump(tx);
        tokio::spawn(
            reflector::reflector(
                iw,
                watcher(
                    Api::<Lenient<AgentIdentity>>::all(client.clone()),
                    watcher::Config::default(),
                )
                .default_backoff()
                .modify(Lenient::slim),
            )
            .for_each(move |e| {
                match e {
                    Ok(_) => on_identity(),
                    Err(e) => tracing::warn!(error = %e, "AgentIdentity watch (distribution) failed; retrying"),
                }
                async {}
            }),
        );
        Self {
            client,
            trust_domain,
            policies,
            identities,
            changed: rx,
            checked: Arc::default(),
            metrics,
        }
    }

    /// Both watches have listed once. Until then this replica knows no
    /// policies: a set it sent would be empty, and a sidecar would swap its
    /// last good set for nothing. The sidecar keeps its set and retries.
    async fn loaded(&self) -> Result<(), Status> {
        const WAIT: std::time::Duration = std::time::Duration::from_secs(10);
        let ready = async {
            self.policies.wait_until_ready().await.is_ok() && self.identities.wait_until_ready().await.is_ok()
        };
        match tokio::time::timeout(WAIT, ready).await {
            Ok(true) => Ok(()),
            _ => Err(Status::unavailable(
                "this operator replica has not loaded AgentPolicies and AgentIdentities yet; retry",
            )),
        }
    }

    /// The AgentIdentity `(namespace, name, spec)` whose SPIFFE ID is `id`.
    /// `None` also when several identities resolve to `id`: an ID two
    /// identities share belongs to neither.
    fn identity_of(&self, id: &str) -> Option<(String, String, AgentIdentity)> {
        let state = self.identities.state();
        let resolved = state.iter().filter_map(|i| {
            let parsed = i.parsed.as_ref().ok()?;
            let ns = i.metadata.namespace.clone()?;
            let name = i.name_any();
            let resolved = mandate_core::spiffe_id::spiffe_id(
                parsed.spec.spiffe_id_template.as_deref(),
                &self.trust_domain,
                &ns,
                &name,
            )
            .ok()?;
            Some(((ns, name, parsed.clone()), resolved))
        });
        mandate_core::spiffe_id::sole_owner(id, resolved)
    }

    /// Whether `spec` compiles and passes its tests (cached per version).
    fn good(&self, version: &str, spec: &AgentPolicySpec) -> bool {
        if let Some(ok) = self.checked.lock().ok().and_then(|m| m.get(version).copied()) {
            return ok;
        }
        let ok = mandate_policy::run_tests(spec).is_ok_and(|r| r.all_passed());
        if let Ok(mut m) = self.checked.lock() {
            m.insert(version.to_string(), ok);
        }
        ok
    }

    /// The set for `identity` in `ns`, for a pod with `labels`.
    pub fn set_for(&self, ns: &str, identity: &str, labels: &BTreeMap<String, String>) -> PolicySet {
        let mut policies = Vec::new();
        let mut withheld = Vec::new();
        let mut all: Vec<_> = self
            .policies
            .state()
            .into_iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
            .collect();
        all.sort_by_key(|p| p.name_any());
        for p in all {
            let name = p.name_any();
            let Ok(policy) = &p.parsed else {
                continue;
            };
            let bound = mandate_core::binding::policy_binds(&policy.spec, Some(identity), labels);
            if !bound {
                continue;
            }
            let status = policy.status.clone().unwrap_or_default();
            // The current spec when it is the ready version; else the last good one.
            let current = mandate_policy::version(&policy.spec);
            let candidate = if status.version.as_deref() == Some(current.as_str()) {
                Some((policy.spec.clone(), current))
            } else {
                status
                    .last_good_spec
                    .clone()
                    .and_then(|v| serde_json::from_value::<AgentPolicySpec>(v).ok())
                    .map(|spec| {
                        let v = mandate_policy::version(&spec);
                        (spec, v)
                    })
                    .filter(|(_, v)| status.version.as_deref() == Some(v.as_str()))
            };
            match candidate {
                Some((spec, version)) if self.good(&version, &spec) => policies.push(Policy {
                    namespace: ns.into(),
                    name,
                    version,
                    spec_json: serde_json::to_string(&spec).unwrap_or_default(),
                }),
                _ => withheld.push(format!(
                    "{ns}/{name}: no version of it has passed compile and tests yet"
                )),
            }
        }
        let mut h = sha2::Sha256::new();
        for p in &policies {
            h.update(format!("{}/{}={}\n", p.namespace, p.name, p.version));
        }
        for w in &withheld {
            h.update(format!("withheld {w}\n"));
        }
        PolicySet {
            set_version: format!("sha256:{:x}", h.finalize()),
            policies,
            withheld,
        }
    }

    /// Who the caller is: its SVID's identity, and the pod it names, which
    /// that identity must select.
    async fn caller(&self, ext: &tonic::Extensions, pod: &str) -> Result<(String, String, Pod), Status> {
        let peer = ext
            .get::<PeerSpiffeId>()
            .ok_or_else(|| Status::unauthenticated("no client SVID"))?;
        let (ns, name, identity) = self
            .identity_of(&peer.0)
            .ok_or_else(|| Status::permission_denied(format!("{} is no AgentIdentity's SPIFFE ID", peer.0)))?;
        let pod = Api::<Pod>::namespaced(self.client.clone(), &ns)
            .get_opt(pod)
            .await
            .map_err(|e| Status::unavailable(format!("reading pod {ns}/{pod}: {e}")))?
            .ok_or_else(|| Status::permission_denied(format!("pod {ns}/{pod} does not exist")))?;
        let selected = mandate_core::binding::selects(&identity.spec.selector, pod.labels());
        if !selected {
            return Err(Status::permission_denied(format!(
                "pod {ns}/{} is not an agent of {} (the SVID's identity)",
                pod.name_any(),
                peer.0
            )));
        }
        Ok((ns, name, pod))
    }
}

type SetStream = tokio_stream::wrappers::ReceiverStream<Result<PolicySet, Status>>;

#[tonic::async_trait]
impl Policies for Distributor {
    type SubscribeStream = SetStream;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<SetStream>, Status> {
        self.loaded().await?;
        let (ns, identity, pod) = self.caller(request.extensions(), &request.get_ref().pod).await?;
        let labels = pod.labels().clone();
        let pod_name = pod.name_any();
        tracing::info!(pod = %format!("{ns}/{pod_name}"), %identity, "sidecar subscribed");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let me = self.clone();
        let mut changed = self.changed.clone();
        tokio::spawn(async move {
            me.metrics.policy_streams.inc();
            let mut last = String::new();
            loop {
                let set = me.set_for(&ns, &identity, &labels);
                if set.set_version != last {
                    last = set.set_version.clone();
                    if tx.send(Ok(set)).await.is_err() {
                        break;
                    }
                }
                tokio::select! {
                    res = changed.changed() => if res.is_err() { break },
                    () = tx.closed() => break,
                }
            }
            me.metrics.policy_streams.dec();
            tracing::info!(pod = %format!("{ns}/{pod_name}"), "sidecar unsubscribed");
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        self.loaded().await?;
        let (ns, _, pod) = self.caller(request.extensions(), &request.get_ref().pod).await?;
        let in_force = request.get_ref().in_force.join(",");
        let patch = serde_json::json!({"metadata": {"annotations": {IN_FORCE_ANNOTATION: in_force}}});
        Api::<Pod>::namespaced(self.client.clone(), &ns)
            .patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| Status::unavailable(format!("recording the ack: {e}")))?;
        Ok(Response::new(AckResponse {}))
    }
}
