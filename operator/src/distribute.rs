//! `mandate.policy.v1.Policies`, served by every replica over mutual TLS:
//! each sidecar, identified by the SPIFFE ID in its client SVID, receives
//! the complete set of AgentPolicies bound to its AgentIdentity, at once
//! and again on every change. Only specs that compile and pass their tests
//! (checked here again, once per version) are sent; while a policy's newest
//! spec does not, its last good spec (kept in its status) is sent instead,
//! and a policy that never had a good version is named as withheld, which
//! sidecars enforce as deny-all.
//!
//! Acks: a sidecar's Ack names the `set_version` it now enforces. It is
//! accepted only on the TLS connection whose Subscribe stream sent that set
//! to that pod (a SPIFFE ID names an identity, shared by all its pods; the
//! connection is what tells one pod's sidecar from another's), and what is
//! recorded is the operator's own copy of that set, in the AgentIdentity's
//! `status.sidecars` (a status subresource only the operator may write), not
//! what the sidecar claims. Anything else is refused with the reason, and
//! counted in `mandate_operator_acks_total{result}`.
//!
//! Brokered credentials ([`crate::broker`]): each set also carries, for
//! every destination of a sent policy that declares a `credential`, its
//! value for this pod (or why there is none). `set_version` covers each
//! credential's policy, destination, source and version, never its value,
//! so a Secret's change or a token's renewal re-sends the set; a stream
//! also wakes when the earliest of its tokens is due for renewal.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mandate_proto::policy::v1::policies_server::Policies;
use mandate_proto::policy::v1::{AckRequest, AckResponse, Credential, Policy, PolicySet, SubscribeRequest};
use sha2::Digest as _;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::admin::Metrics;
use crate::broker::{self, Broker, PodRef};
use crate::lenient::Lenient;
use mandate_api::crd::{AgentIdentity, AgentPolicy, AgentPolicySpec, SidecarAck};

/// The peer's SPIFFE ID, put into each request by the TLS server.
#[derive(Debug, Clone)]
pub struct PeerSpiffeId(pub String);

/// The TLS connection a request arrived on: a number per accepted
/// connection, put into each request by the TLS server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerConnection(pub u64);

/// Field manager of the acks in AgentIdentity `status.sidecars`.
pub const ACK_MANAGER: &str = "mandate-operator-acks";

/// Sets remembered per stream (an ack may trail the next set by a little).
const SETS_REMEMBERED: usize = 4;

/// Attempts to write an ack when other writers keep changing the identity.
const ACK_ATTEMPTS: usize = 5;

/// What one Subscribe stream sent: to whom, on which connection, and the
/// latest sets (their version and `namespace/name=version` of each policy).
#[derive(Debug)]
struct Sent {
    connection: u64,
    spiffe_id: String,
    pod_uid: String,
    sets: VecDeque<(String, Vec<String>)>,
}

/// `namespace/name=version` of each policy in `set` (withheld ones enforce
/// deny-all and run no version of their policy).
fn policies_in(set: &PolicySet) -> Vec<String> {
    set.policies
        .iter()
        .map(|p| format!("{}/{}={}", p.namespace, p.name, p.version))
        .collect()
}

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
    /// stream number → what it sent (until it ends).
    sent: Arc<Mutex<HashMap<u64, Sent>>>,
    streams: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    /// Brokered credentials (`--credential-brokering`); `None`: off, and
    /// every credential is sent as unavailable, saying so.
    broker: Option<Arc<Broker>>,
}

impl std::fmt::Debug for Distributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distributor").finish()
    }
}

impl Distributor {
    /// Start the watches and return the service. With `brokering`, the
    /// labelled Secrets are watched too (else no Secret is ever read).
    pub fn start(client: Client, trust_domain: String, metrics: Arc<Metrics>, brokering: bool) -> Self {
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
        let on_identity = bump(tx.clone());
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
        let broker = brokering.then(|| Broker::start(client.clone(), bump(tx)));
        Self {
            client,
            trust_domain,
            policies,
            identities,
            changed: rx,
            checked: Arc::default(),
            sent: Arc::default(),
            streams: Arc::default(),
            metrics,
            broker,
        }
    }

    /// The watches have listed once. Until then this replica knows no
    /// policies: a set it sent would be empty, and a sidecar would swap its
    /// last good set for nothing (or its credentials for "missing"). The
    /// sidecar keeps its set and retries.
    async fn loaded(&self) -> Result<(), Status> {
        const WAIT: std::time::Duration = std::time::Duration::from_secs(10);
        let ready = async {
            self.policies.wait_until_ready().await.is_ok()
                && self.identities.wait_until_ready().await.is_ok()
                && match &self.broker {
                    Some(b) => b.ready().await,
                    None => true,
                }
        };
        match tokio::time::timeout(WAIT, ready).await {
            Ok(true) => Ok(()),
            _ => Err(Status::unavailable(if self.broker.is_some() {
                "this operator replica has not loaded AgentPolicies, AgentIdentities and brokered Secrets yet; retry"
            } else {
                "this operator replica has not loaded AgentPolicies and AgentIdentities yet; retry"
            })),
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

    /// The set for `identity` in `ns`, for the pod `pod` with `labels`, and
    /// when it must be made again (the earliest token renewal).
    pub async fn set_for(
        &self,
        ns: &str,
        identity: &str,
        labels: &BTreeMap<String, String>,
        pod: &PodRef,
    ) -> (PolicySet, Option<tokio::time::Instant>) {
        let mut policies = Vec::new();
        let mut withheld = Vec::new();
        // The specs sent (current or last good): their credentials go along.
        let mut sent_specs: Vec<(String, AgentPolicySpec, bool)> = Vec::new();
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
            // Bound by the spec that is sent: a last good spec applies to
            // the agents it named, never to those a failing edit points at.
            let binding = candidate.as_ref().map_or(&policy.spec, |(spec, _)| spec);
            if !mandate_core::binding::policy_binds(binding, Some(identity), labels) {
                continue;
            }
            match candidate {
                Some((spec, version)) if self.good(&version, &spec) => {
                    policies.push(Policy {
                        namespace: ns.into(),
                        name: name.clone(),
                        version,
                        spec_json: serde_json::to_string(&spec).unwrap_or_default(),
                    });
                    // Only the current spec passed admission's access review
                    // of its credentials; a last good spec comes from status,
                    // which admission does not see.
                    let current = spec == policy.spec;
                    sent_specs.push((format!("{ns}/{name}"), spec, current));
                }
                _ => withheld.push(format!(
                    "{ns}/{name}: no version of it has passed compile and tests yet"
                )),
            }
        }
        let (credentials, due) = self.credentials(ns, &sent_specs, pod).await;
        let mut h = sha2::Sha256::new();
        for p in &policies {
            h.update(format!("{}/{}={}\n", p.namespace, p.name, p.version));
        }
        for w in &withheld {
            h.update(format!("withheld {w}\n"));
        }
        // Each credential's identity and version, and why it is unavailable;
        // never its value.
        for c in &credentials {
            h.update(format!(
                "credential {} {}:{} {} version={} expires={} unavailable={}\n",
                c.policy, c.host, c.port, c.source, c.version, c.expires_unix, c.unavailable
            ));
        }
        let set = PolicySet {
            set_version: format!("sha256:{:x}", h.finalize()),
            policies,
            withheld,
            credentials,
        };
        (set, due)
    }

    /// The credentials of the destinations of `specs` for `pod`, and when
    /// the earliest of them is due again.
    async fn credentials(
        &self,
        ns: &str,
        specs: &[(String, AgentPolicySpec, bool)],
        pod: &PodRef,
    ) -> (Vec<Credential>, Option<tokio::time::Instant>) {
        let mut out = Vec::new();
        let mut due: Option<tokio::time::Instant> = None;
        for (policy, spec, current) in specs {
            for dest in &spec.egress {
                let Some(cred) = &dest.credential else { continue };
                match &self.broker {
                    None => out.push(broker::unavailable(ns, policy, dest, cred, broker::OFF)),
                    Some(_) if !current => out.push(broker::unavailable(ns, policy, dest, cred, broker::NOT_CURRENT)),
                    Some(b) => {
                        let (c, d) = b.credential(ns, policy, dest, cred, pod).await;
                        due = match (due, d) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                        out.push(c);
                    }
                }
            }
        }
        (out, due)
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
        let pod_ref = PodRef {
            name: pod_name.clone(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
        };
        // What this stream sends is remembered for the acks on its connection.
        let stream = self.streams.fetch_add(1, Ordering::Relaxed);
        let connection = request.extensions().get::<PeerConnection>().map(|c| c.0);
        let spiffe_id = request.extensions().get::<PeerSpiffeId>().map(|p| p.0.clone());
        if let (Some(connection), Some(spiffe_id), Some(pod_uid)) = (connection, spiffe_id, pod.metadata.uid.clone())
            && let Ok(mut sent) = self.sent.lock()
        {
            sent.insert(
                stream,
                Sent {
                    connection,
                    spiffe_id,
                    pod_uid,
                    sets: VecDeque::new(),
                },
            );
        }
        tracing::info!(pod = %format!("{ns}/{pod_name}"), %identity, "sidecar subscribed");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let me = self.clone();
        let mut changed = self.changed.clone();
        tokio::spawn(async move {
            me.metrics.policy_streams.inc();
            let mut last = String::new();
            loop {
                let (set, due) = tokio::select! {
                    made = me.set_for(&ns, &identity, &labels, &pod_ref) => made,
                    () = tx.closed() => break,
                };
                if set.set_version != last {
                    last = set.set_version.clone();
                    // Remembered before it is sent: its ack may come at once.
                    me.remember(stream, &set);
                    if tx.send(Ok(set)).await.is_err() {
                        break;
                    }
                }
                // Also woken when a brokered token is due for renewal.
                let renewal = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    res = changed.changed() => if res.is_err() { break },
                    () = renewal => {},
                    () = tx.closed() => break,
                }
            }
            let last_stream_of_pod = match me.sent.lock() {
                Ok(mut sent) => {
                    sent.remove(&stream);
                    !sent.values().any(|s| s.pod_uid == pod_ref.uid)
                }
                Err(_) => true,
            };
            if last_stream_of_pod && let Some(b) = &me.broker {
                b.forget_pod(&pod_ref.uid);
            }
            me.metrics.policy_streams.dec();
            tracing::info!(pod = %format!("{ns}/{pod_name}"), "sidecar unsubscribed");
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        self.loaded().await?;
        let result = self.take_ack(&request).await;
        let outcome = match &result {
            Ok(()) => "recorded",
            Err(s) if s.code() == tonic::Code::Unavailable => "failed",
            Err(_) => "refused",
        };
        self.metrics
            .acks
            .get_or_create(&crate::admin::AckLabels { result: outcome })
            .inc();
        if let Err(s) = &result {
            tracing::warn!(pod = %request.get_ref().pod, set = %request.get_ref().set_version, reason = %s.message(), "ack {outcome}");
        }
        result.map(|()| Response::new(AckResponse {}))
    }
}

impl Distributor {
    /// Note that `stream` sent `set` (the latest few are kept).
    fn remember(&self, stream: u64, set: &PolicySet) {
        if let Ok(mut sent) = self.sent.lock()
            && let Some(s) = sent.get_mut(&stream)
        {
            s.sets.retain(|(v, _)| *v != set.set_version);
            s.sets.push_back((set.set_version.clone(), policies_in(set)));
            while s.sets.len() > SETS_REMEMBERED {
                s.sets.pop_front();
            }
        }
    }

    /// The policies of `set_version` if a stream on `connection` sent that
    /// set to the pod `pod_uid` as `spiffe_id`; else why not.
    fn sent_to(
        &self,
        connection: u64,
        spiffe_id: &str,
        pod_uid: &str,
        set_version: &str,
    ) -> Result<Vec<String>, String> {
        let sent = self
            .sent
            .lock()
            .map_err(|_| "the operator's record of sent sets is unusable".to_string())?;
        let mut streams = sent
            .values()
            .filter(|s| s.connection == connection && s.spiffe_id == spiffe_id && s.pod_uid == pod_uid)
            .peekable();
        if streams.peek().is_none() {
            return Err("no policy stream for this pod is open on this connection: \
                 a sidecar acks on the connection it subscribed on, for its own pod"
                .into());
        }
        streams
            .find_map(|s| s.sets.iter().find(|(v, _)| v == set_version).map(|(_, p)| p.clone()))
            .ok_or_else(|| format!("set {set_version} was never sent to this pod on this connection"))
    }

    /// Check an ack and record it in the AgentIdentity's `status.sidecars`.
    async fn take_ack(&self, request: &Request<AckRequest>) -> Result<(), Status> {
        let ack = request.get_ref();
        let (ns, identity, pod) = self.caller(request.extensions(), &ack.pod).await?;
        let pod_name = pod.name_any();
        let pod_uid = pod
            .metadata
            .uid
            .clone()
            .ok_or_else(|| Status::unavailable(format!("pod {ns}/{pod_name} has no uid")))?;
        let connection = request
            .extensions()
            .get::<PeerConnection>()
            .ok_or_else(|| Status::failed_precondition("this request came on no policy stream's connection"))?;
        let spiffe_id = request
            .extensions()
            .get::<PeerSpiffeId>()
            .ok_or_else(|| Status::unauthenticated("no client SVID"))?;
        let in_force = self
            .sent_to(connection.0, &spiffe_id.0, &pod_uid, &ack.set_version)
            .map_err(|why| Status::failed_precondition(format!("ack for pod {ns}/{pod_name} refused: {why}")))?;
        let entry = SidecarAck {
            pod: pod_name,
            pod_uid,
            set_version: ack.set_version.clone(),
            in_force,
            acked_at: mandate_api::meta::Time(jiff::Timestamp::now()),
        };
        self.record(&ns, &identity, entry).await
    }

    /// Write `entry` into `status.sidecars` of the identity `name` (with its
    /// resourceVersion: several replicas write; a conflict is retried), and
    /// drop the entries of pods that no longer exist.
    async fn record(&self, ns: &str, name: &str, entry: SidecarAck) -> Result<(), Status> {
        let api = Api::<AgentIdentity>::namespaced(self.client.clone(), ns);
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns);
        let unavailable = |what: &str, e: kube::Error| Status::unavailable(format!("{what}: {e}"));
        for _ in 0..ACK_ATTEMPTS {
            let current = api
                .get_status(name)
                .await
                .map_err(|e| unavailable("reading the AgentIdentity to record the ack", e))?;
            let before = current.status.clone().map(|s| s.sidecars).unwrap_or_default();
            // The pods that exist now (by uid): only their entries are kept.
            let live: Option<HashMap<String, String>> =
                match mandate_core::selector::Selector::try_from(&current.spec.selector) {
                    Ok(sel) if !sel.selects_all() => Some(
                        pods.list_metadata(&ListParams::default().labels(&sel.to_string()))
                            .await
                            .map_err(|e| unavailable("listing the identity's pods to record the ack", e))?
                            .items
                            .into_iter()
                            .filter_map(|p| Some((p.metadata.name?, p.metadata.uid?)))
                            .collect(),
                    ),
                    _ => None,
                };
            let mut after: Vec<SidecarAck> = before
                .iter()
                .filter(|e| e.pod != entry.pod)
                .filter(|e| live.as_ref().is_none_or(|l| l.get(&e.pod) == Some(&e.pod_uid)))
                .cloned()
                .collect();
            let unchanged = before.len() == after.len() + 1
                && before.iter().any(|e| {
                    e.pod == entry.pod
                        && e.pod_uid == entry.pod_uid
                        && e.set_version == entry.set_version
                        && e.in_force == entry.in_force
                });
            if unchanged {
                return Ok(());
            }
            after.push(entry.clone());
            after.sort_by(|a, b| a.pod.cmp(&b.pod));
            let patch = serde_json::json!({
                "apiVersion": "mandate.dev/v1alpha1", "kind": "AgentIdentity",
                "metadata": {"name": name, "resourceVersion": current.metadata.resource_version},
                "status": {"sidecars": after},
            });
            match api
                .patch_status(name, &PatchParams::apply(ACK_MANAGER).force(), &Patch::Apply(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(unavailable("recording the ack", e)),
            }
        }
        Err(Status::unavailable(format!(
            "recording the ack: AgentIdentity {ns}/{name} kept changing ({ACK_ATTEMPTS} attempts)"
        )))
    }
}
