//! Admission webhooks, served over TLS by every operator replica:
//!
//! - `/mutate/pods`: inject Envoy + mandate-sidecar into agent pods;
//! - `/validate/pods`: refuse an agent pod without (or with altered) injection;
//! - `/validate/namespaces`: refuse removing (or changing) `mandate.dev/enforce`
//!   from a namespace while injected agent pods still run in it;
//! - `/validate/agentpolicies`: refuse a policy that does not compile or whose tests fail,
//!   or that brokers a credential its author may not read ([`brokered`]);
//! - `/validate/agentidentities`: refuse a malformed or overlapping identity;
//! - `/mutate/agentapprovals`, `/validate/agentapprovals`: only the decision
//!   changes, and the approver is recorded from the request's user.
//!
//! A body that is not an AdmissionReview gets HTTP 400 with the reason (the
//! apiserver then applies the webhook's failure policy: Fail). Everything
//! else gets an AdmissionReview answer, allowed or denied with a message.
//!
//! One generic handler (`admit`) does that for every route, and counts the
//! answer; what each kind decides is its [`Validate`] or [`Mutate`] impl.

pub mod brokered;
pub mod drift;
pub mod inject;
pub mod tls;
pub mod validate;

use mandate_api::names::{ENFORCE_LABEL, INJECT_LABEL};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::de::DeserializeOwned;

use crate::admin::Metrics;
use crate::lenient::Lenient;
use inject::{AgentRef, InjectConfig};
use mandate_api::crd::{AgentApproval, AgentIdentity, AgentPolicy, ApprovalPhase};

/// Longest a policy may take to compile and test inside an admission
/// request (the apiserver's own timeout is the webhook's `timeoutSeconds`).
pub const POLICY_DEADLINE: Duration = Duration::from_secs(8);

/// What every handler needs.
#[derive(Clone)]
pub struct WebhookState {
    pub inject: Arc<InjectConfig>,
    pub trust_domain: String,
    /// The operator's own namespace (never injected).
    pub operator_namespace: String,
    /// The operator's own user name, the only one that may expire approvals.
    pub operator_user: String,
    /// Inject native sidecars (Kubernetes >= 1.29).
    pub native_sidecars: bool,
    /// `--credential-brokering`: policies may name credentials (each checked
    /// against its author's RBAC); off, such policies are refused.
    pub credential_brokering: bool,
    pub identities: Store<Lenient<AgentIdentity>>,
    pub namespaces: Store<Namespace>,
    /// Both stores have listed once (set by [`stores`]' watcher task).
    pub synced: Arc<std::sync::atomic::AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// For live reads when the caches say "not ours": a namespace labelled,
    /// or an AgentIdentity created, moments ago may not have reached them.
    pub client: Client,
}

impl std::fmt::Debug for WebhookState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookState")
            .field("operator_namespace", &self.operator_namespace)
            .field("native_sidecars", &self.native_sidecars)
            .finish()
    }
}

/// The stores the webhooks read, and whether both have listed once.
pub type Stores = (
    Store<Lenient<AgentIdentity>>,
    Store<Namespace>,
    Arc<std::sync::atomic::AtomicBool>,
);

/// Start the watches the webhooks read (identities, namespaces); the stores
/// fill in the background, and the flag turns true once both have listed.
pub fn stores(client: &Client) -> Stores {
    let (ids, ids_writer) = reflector::store();
    let identities: Api<Lenient<AgentIdentity>> = Api::all(client.clone());
    tokio::spawn(
        reflector::reflector(
            ids_writer,
            watcher(identities, watcher::Config::default())
                .default_backoff()
                .modify(Lenient::slim),
        )
        .for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "AgentIdentity watch failed; retrying");
            }
        }),
    );
    let (nss, ns_writer) = reflector::store();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    tokio::spawn(
        reflector::reflector(
            ns_writer,
            watcher(namespaces, watcher::Config::default())
                .default_backoff()
                .modify(|n| crate::lenient::slim_meta(&mut n.metadata)),
        )
        .for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "Namespace watch failed; retrying");
            }
        }),
    );
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (ids, nss, synced) = (ids.clone(), nss.clone(), synced.clone());
        tokio::spawn(async move {
            if ids.wait_until_ready().await.is_ok() && nss.wait_until_ready().await.is_ok() {
                synced.store(true, std::sync::atomic::Ordering::Release);
                tracing::info!("webhooks: identities and namespaces loaded");
            }
        });
    }
    (ids, nss, synced)
}

/// The webhook routes: one generic handler, one decision per kind.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/mutate/pods", post(admit::<Mutating, Pod>))
        .route("/validate/pods", post(admit::<Validating, Pod>))
        .route("/validate/namespaces", post(admit::<Validating, Namespace>))
        .route("/validate/agentpolicies", post(admit::<Validating, AgentPolicy>))
        .route("/validate/agentidentities", post(admit::<Validating, AgentIdentity>))
        .route("/mutate/agentapprovals", post(admit::<Mutating, AgentApproval>))
        .route("/validate/agentapprovals", post(admit::<Validating, AgentApproval>))
        .with_state(state)
}

/// Serve `app` over TLS on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    certs: Arc<tls::CertStore>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_tls(addr, certs.server_config()?, app, shutdown).await
}

/// Serve `app` with this TLS configuration. When the client presented a
/// certificate, its SPIFFE ID goes into every request's extensions as
/// [`crate::distribute::PeerSpiffeId`], and every request gets its
/// connection's number as [`crate::distribute::PeerConnection`].
pub async fn serve_tls(
    addr: SocketAddr,
    config: rustls::ServerConfig,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "listening (TLS)");
    tokio::pin!(shutdown);
    // One count for the process: numbers are never reused, whatever server restarts.
    static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let connection =
            crate::distribute::PeerConnection(CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let spiffe = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| mandate_identity::verify::spiffe_id_of(c).ok());
            let app =
                tower::ServiceExt::map_request(app, move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    if let Some(id) = &spiffe {
                        req.extensions_mut().insert(crate::distribute::PeerSpiffeId(id.clone()));
                    }
                    req.extensions_mut().insert(connection);
                    req
                });
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

// ------------------------------------------------------------------ plumbing

/// How a validating webhook decides on objects of kind `T`; implemented
/// once per kind.
pub trait Validate<T> {
    /// What the AdmissionReview's objects are read as: Mandate's own kinds
    /// are read as [`DynamicObject`] and parsed by the decision, so that a
    /// malformed object is denied with a message rather than refused with 400.
    type Review: kube::Resource + DeserializeOwned + Send + Sync + 'static;
    /// The webhook's name in metrics.
    const WEBHOOK: &'static str;
    /// Allow or deny (with a message).
    fn validate(&self, req: &AdmissionRequest<Self::Review>) -> impl Future<Output = AdmissionResponse> + Send;
}

/// How a mutating webhook decides on (and patches) objects of kind `T`;
/// implemented once per kind.
pub trait Mutate<T> {
    /// See [`Validate::Review`].
    type Review: kube::Resource + DeserializeOwned + Send + Sync + 'static;
    /// The webhook's name in metrics.
    const WEBHOOK: &'static str;
    /// Allow (with a patch, or not) or deny (with a message).
    fn mutate(&self, req: &AdmissionRequest<Self::Review>) -> impl Future<Output = AdmissionResponse> + Send;
}

/// Which of [`Validate`] and [`Mutate`] the one handler asks.
trait Decide<T> {
    type Review: kube::Resource + DeserializeOwned + Send + Sync + 'static;
    const WEBHOOK: &'static str;
    fn decide(
        state: &WebhookState,
        req: &AdmissionRequest<Self::Review>,
    ) -> impl Future<Output = AdmissionResponse> + Send;
}

/// The validating webhooks.
enum Validating {}
/// The mutating webhooks.
enum Mutating {}

impl<T> Decide<T> for Validating
where
    WebhookState: Validate<T>,
{
    type Review = <WebhookState as Validate<T>>::Review;
    const WEBHOOK: &'static str = <WebhookState as Validate<T>>::WEBHOOK;
    fn decide(
        state: &WebhookState,
        req: &AdmissionRequest<Self::Review>,
    ) -> impl Future<Output = AdmissionResponse> + Send {
        state.validate(req)
    }
}

impl<T> Decide<T> for Mutating
where
    WebhookState: Mutate<T>,
{
    type Review = <WebhookState as Mutate<T>>::Review;
    const WEBHOOK: &'static str = <WebhookState as Mutate<T>>::WEBHOOK;
    fn decide(
        state: &WebhookState,
        req: &AdmissionRequest<Self::Review>,
    ) -> impl Future<Output = AdmissionResponse> + Send {
        state.mutate(req)
    }
}

/// The one admission handler: read the AdmissionReview (HTTP 400 when the
/// body is not one), decide, count, answer.
async fn admit<D: Decide<T>, T>(State(state): State<WebhookState>, body: Bytes) -> Response {
    let started = Instant::now();
    let req: AdmissionRequest<D::Review> = match review(&body) {
        Ok(r) => r,
        Err(why) => return bad_request(why),
    };
    let resp = D::decide(&state, &req).await;
    state.observe(D::WEBHOOK, &resp, started);
    answer(resp)
}

/// Parse the body as an AdmissionReview of `K`, or say why not.
fn review<K>(body: &Bytes) -> Result<AdmissionRequest<K>, String>
where
    K: kube::Resource + DeserializeOwned,
{
    let review: AdmissionReview<K> = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not an AdmissionReview this webhook reads: {e}"))?;
    review
        .try_into()
        .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| {
            format!("the AdmissionReview has no request: {e}")
        })
}

/// One of Mandate's own objects, read from the review as `kind`.
fn parse<T: DeserializeOwned>(obj: &DynamicObject, kind: &str) -> Result<T, String> {
    serde_json::to_value(obj)
        .and_then(serde_json::from_value::<T>)
        .map_err(|e| format!("this is not a valid {kind}: {e}"))
}

/// HTTP 400 with the reason: what a body that is not an AdmissionReview gets.
fn bad_request(why: String) -> Response {
    (StatusCode::BAD_REQUEST, why).into_response()
}

fn answer(resp: AdmissionResponse) -> Response {
    axum::Json(resp.into_review()).into_response()
}

/// A denial with a message and HTTP-like code 403 in its status.
fn deny<K: kube::Resource>(req: &AdmissionRequest<K>, message: impl ToString) -> AdmissionResponse {
    let mut resp = AdmissionResponse::from(req).deny(message);
    resp.result.code = 403;
    resp.result.reason = "Forbidden".into();
    resp
}

impl WebhookState {
    fn observe(&self, webhook: &'static str, resp: &AdmissionResponse, started: Instant) {
        let result = if !resp.allowed {
            "denied"
        } else if resp.patch.is_some() {
            "patched"
        } else {
            "allowed"
        };
        self.metrics.observe_admission(webhook, result, started.elapsed());
    }

    /// Whether pods in `ns` are Mandate's to decide: labelled for enforcement,
    /// and neither kube-system nor the operator's own namespace. `None` when
    /// the namespace is not known (yet).
    fn enforced(&self, ns: &str) -> Option<bool> {
        if ns == "kube-system" || ns == self.operator_namespace {
            return Some(false);
        }
        let key = reflector::ObjectRef::<Namespace>::new(ns);
        self.namespaces
            .get(&key)
            .map(|n| n.labels().get(ENFORCE_LABEL).map(String::as_str) == Some("true"))
    }

    /// The identity this pod is an agent of, by the cached identities:
    /// `Ok(None)` when it is not selected (and not opted in), an error when
    /// more than one selects it.
    fn agent_of(&self, pod: &Pod, ns: &str) -> Result<Option<AgentRef>, String> {
        let state = self.identities.state();
        let cached = state
            .iter()
            .filter(|i| i.metadata.namespace.as_deref() == Some(ns))
            .filter_map(|i| i.parsed.as_ref().ok().map(|p| (i.name_any(), p.clone())));
        self.choose(pod, ns, cached)
    }

    /// The same, by the identities the apiserver has now.
    async fn agent_of_live(&self, pod: &Pod, ns: &str) -> Result<Option<AgentRef>, String> {
        let api = Api::<Lenient<AgentIdentity>>::namespaced(self.client.clone(), ns);
        let list = tokio::time::timeout(LIVE_READ_TIMEOUT, api.list(&Default::default()))
            .await
            .map_err(|_| format!("Mandate's operator could not list AgentIdentities in {ns} in time; retry shortly"))?
            .map_err(|e| format!("Mandate's operator could not list AgentIdentities in {ns} ({e}); retry shortly"))?;
        let live = list
            .items
            .into_iter()
            .filter_map(|i| i.parsed.ok().map(|p| (p.name_any(), p)));
        self.choose(pod, ns, live)
    }

    /// Whether `ns` is labelled for enforcement, asked of the apiserver.
    async fn enforced_live(&self, ns: &str) -> Result<bool, String> {
        let api = Api::<Namespace>::all(self.client.clone());
        let got = tokio::time::timeout(LIVE_READ_TIMEOUT, api.get_opt(ns))
            .await
            .map_err(|_| format!("Mandate's operator could not read namespace {ns} in time; retry shortly"))?
            .map_err(|e| format!("Mandate's operator could not read namespace {ns} ({e}); retry shortly"))?;
        Ok(got.is_some_and(|n| n.labels().get(ENFORCE_LABEL).map(String::as_str) == Some("true")))
    }

    fn choose(
        &self,
        pod: &Pod,
        ns: &str,
        identities: impl Iterator<Item = (String, AgentIdentity)>,
    ) -> Result<Option<AgentRef>, String> {
        let labels = pod.labels();
        let mut matching: Vec<(String, AgentIdentity)> = identities
            .filter(|(_, i)| mandate_core::binding::selects(&i.spec.selector, labels))
            .collect();
        matching.sort_by(|a, b| a.0.cmp(&b.0));
        match matching.as_slice() {
            [] if labels.get(INJECT_LABEL).map(String::as_str) == Some("true") => Ok(Some(AgentRef::default())),
            [] => Ok(None),
            [(name, id)] => Ok(Some(AgentRef {
                identity: Some(name.clone()),
                spiffe_id: mandate_core::spiffe_id::spiffe_id(
                    id.spec.spiffe_id_template.as_deref(),
                    &self.trust_domain,
                    ns,
                    name,
                )
                .ok(),
            })),
            many => Err(format!(
                "the pod is selected by more than one AgentIdentity ({}); an agent has exactly one identity",
                many.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// Both watches have listed at least once.
    fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }
}

// ------------------------------------------------------------------ pods

/// What the pod webhooks make of one pod: not ours, or an agent (or an error).
enum PodScope {
    NotOurs,
    Agent(AgentRef),
    Refuse(String),
}

/// How long a live read (when the caches say "not ours") may take; the
/// apiserver's webhook timeout is a few seconds.
const LIVE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The caches answer first; a pod they call "not ours" is checked against
/// the apiserver before it is let in unmediated, so an agent created right
/// after its namespace was labelled or its AgentIdentity applied (one
/// `kubectl apply` of both, a GitOps sync) is injected, not missed.
async fn pod_scope(state: &WebhookState, req: &AdmissionRequest<Pod>, pod: &Pod) -> PodScope {
    let ns = req.namespace.clone().or_else(|| pod.namespace()).unwrap_or_default();
    if !state.synced() {
        return PodScope::Refuse(
            "Mandate's operator has not loaded namespaces and identities yet; retry shortly".into(),
        );
    }
    if ns == "kube-system" || ns == state.operator_namespace {
        return PodScope::NotOurs;
    }
    if state.enforced(&ns) != Some(true) {
        match state.enforced_live(&ns).await {
            Ok(true) => {}
            Ok(false) => return PodScope::NotOurs,
            Err(e) => return PodScope::Refuse(e),
        }
    }
    match state.agent_of(pod, &ns) {
        Ok(Some(agent)) => PodScope::Agent(agent),
        Ok(None) => match state.agent_of_live(pod, &ns).await {
            Ok(Some(agent)) => PodScope::Agent(agent),
            Ok(None) => PodScope::NotOurs,
            Err(e) => PodScope::Refuse(e),
        },
        Err(e) => PodScope::Refuse(e),
    }
}

impl Mutate<Pod> for WebhookState {
    type Review = Pod;
    const WEBHOOK: &'static str = "mutate-pods";
    async fn mutate(&self, req: &AdmissionRequest<Pod>) -> AdmissionResponse {
        mutate_pod(self, req).await
    }
}

async fn mutate_pod(state: &WebhookState, req: &AdmissionRequest<Pod>) -> AdmissionResponse {
    if req.operation != Operation::Create {
        return AdmissionResponse::from(req);
    }
    let Some(pod) = &req.object else {
        return deny(req, "the request carries no pod");
    };
    let agent = match pod_scope(state, req, pod).await {
        PodScope::NotOurs => return AdmissionResponse::from(req),
        PodScope::Refuse(why) => return deny(req, why),
        PodScope::Agent(a) => a,
    };
    match inject::inject(pod, &state.inject, &agent, state.native_sidecars) {
        Ok(None) => AdmissionResponse::from(req),
        Ok(Some(injection)) => {
            let mut resp = match AdmissionResponse::from(req).with_patch(json_patch::Patch(injection.patch)) {
                Ok(r) => r,
                Err(e) => return deny(req, format!("Mandate could not encode its patch: {e}")),
            };
            if !injection.warnings.is_empty() {
                resp.warnings = Some(injection.warnings);
            }
            tracing::info!(
                namespace = req.namespace.as_deref().unwrap_or(""),
                pod = %pod.name_any(),
                identity = agent.identity.as_deref().unwrap_or("(opt-in)"),
                "injecting Envoy and mandate-sidecar"
            );
            resp
        }
        Err(e) => deny(req, format!("Mandate cannot inject this agent pod: {e}")),
    }
}

impl Validate<Pod> for WebhookState {
    type Review = Pod;
    const WEBHOOK: &'static str = "validate-pods";
    async fn validate(&self, req: &AdmissionRequest<Pod>) -> AdmissionResponse {
        validate_pod(self, req).await
    }
}

async fn validate_pod(state: &WebhookState, req: &AdmissionRequest<Pod>) -> AdmissionResponse {
    let Some(pod) = &req.object else {
        return AdmissionResponse::from(req); // DELETE
    };
    // A pod Mandate injected stays isolated whatever its labels say now (a
    // pod relabelled away from its identity is otherwise not an agent here).
    if let (Operation::Update, Some(old)) = (&req.operation, &req.old_object)
        && old.annotations().contains_key(mandate_api::names::INJECTED_ANNOTATION)
    {
        if ephemeral_added(Some(old), pod) {
            return deny(req, EPHEMERAL_REFUSED);
        }
        if let Some(why) = inject::isolation_breach(pod, &state.inject) {
            return deny(req, why);
        }
        if old.labels() != pod.labels() {
            let ns = req.namespace.clone().or_else(|| pod.namespace()).unwrap_or_default();
            if let Some(why) = rebinding(state, &ns, old, pod).await {
                return deny(req, why);
            }
        }
    }
    let agent = match pod_scope(state, req, pod).await {
        PodScope::NotOurs => return AdmissionResponse::from(req),
        PodScope::Refuse(why) => return deny(req, why),
        PodScope::Agent(a) => a,
    };
    match req.operation {
        Operation::Create => match inject::injection_difference(pod, &state.inject, &agent, state.native_sidecars) {
            None => AdmissionResponse::from(req),
            Some(why) => deny(
                req,
                format!(
                    "this pod is an agent in a namespace Mandate enforces, but it does not carry Mandate's injected proxy and sidecar as Mandate injects them, or breaks what Mandate holds agent pods to: {why} (is the mutating webhook configured?)"
                ),
            ),
        },
        Operation::Update if ephemeral_added(req.old_object.as_ref(), pod) => deny(req, EPHEMERAL_REFUSED),
        Operation::Update => {
            // The injected containers must survive any update unchanged.
            let names = [
                mandate_api::names::ENVOY_CONTAINER,
                mandate_api::names::SIDECAR_CONTAINER,
            ];
            let containers = |p: &Pod| {
                p.spec
                    .as_ref()
                    .map(|s| {
                        s.containers
                            .iter()
                            .chain(s.init_containers.iter().flatten())
                            .filter(|c| names.contains(&c.name.as_str()))
                            .map(|c| (c.name.clone(), c.image.clone(), c.command.clone(), c.args.clone()))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            };
            let before = req.old_object.as_ref().map(containers).unwrap_or_default();
            let after = containers(pod);
            let marker = |p: &Pod| p.annotations().get(mandate_api::names::INJECTED_ANNOTATION).cloned();
            if after.len() == names.len() && before == after && req.old_object.as_ref().map(marker) == Some(marker(pod))
            {
                AdmissionResponse::from(req)
            } else {
                deny(
                    req,
                    "this agent pod's Mandate proxy and sidecar (or their marker) would be removed or changed by this update; that is not allowed in a namespace Mandate enforces",
                )
            }
        }
        _ => AdmissionResponse::from(req),
    }
}

/// Why relabelling an injected pod from `old` to `new` is refused, if it
/// is: it would change the AgentIdentity that selects it, or an AgentPolicy
/// bound by `agentSelector` would bind it or stop binding it. Whoever may
/// patch pod labels could otherwise shed a policy from a running agent (its
/// sidecar's set follows its labels). The binding is fixed when the pod is
/// created; to change it, re-create the pod. A read that fails is a refusal.
async fn rebinding(state: &WebhookState, ns: &str, old: &Pod, new: &Pod) -> Option<String> {
    let identity = |p: &Pod| {
        let p = p.clone();
        async move { state.agent_of_live(&p, ns).await.map(|a| a.map(|a| a.identity)) }
    };
    let (before, after) = match (identity(old).await, identity(new).await) {
        (Ok(b), Ok(a)) => (b, a),
        (Err(e), _) | (_, Err(e)) => return Some(e),
    };
    let name = |i: &Option<Option<String>>| match i {
        None => "no identity (not an agent)".to_string(),
        Some(None) => "the opt-in label, with no identity".to_string(),
        Some(Some(n)) => format!("AgentIdentity {n}"),
    };
    if before != after {
        return Some(format!(
            "this label change would make the agent pod's identity {} instead of {}; an injected pod's binding is fixed when it is created: re-create the pod with the new labels",
            name(&after),
            name(&before)
        ));
    }
    let identity = before.flatten();
    let api = Api::<Lenient<AgentPolicy>>::namespaced(state.client.clone(), ns);
    let policies = match tokio::time::timeout(LIVE_READ_TIMEOUT, api.list(&Default::default())).await {
        Ok(Ok(list)) => list.items,
        Ok(Err(e)) => {
            return Some(format!(
                "Mandate's operator could not list AgentPolicies in {ns} ({e}) to check this label change; retry shortly"
            ));
        }
        Err(_) => {
            return Some(format!(
                "Mandate's operator could not list AgentPolicies in {ns} in time to check this label change; retry shortly"
            ));
        }
    };
    let mut changed: Vec<String> = policies
        .iter()
        .filter_map(|p| {
            let spec = &p.parsed.as_ref().ok()?.spec;
            let binds = |pod: &Pod| mandate_core::binding::policy_binds(spec, identity.as_deref(), pod.labels());
            let (was, is) = (binds(old), binds(new));
            (was != is).then(|| {
                format!(
                    "{} ({})",
                    p.name_any(),
                    if is { "would bind it" } else { "would stop binding it" }
                )
            })
        })
        .collect();
    changed.sort();
    (!changed.is_empty()).then(|| {
        format!(
            "this label change would change the AgentPolicies bound to the agent pod: {}; an injected pod's binding is fixed when it is created: re-create the pod with the new labels",
            changed.join(", ")
        )
    })
}

const EPHEMERAL_REFUSED: &str = "ephemeral containers (kubectl debug) are refused on agent pods in a namespace Mandate enforces: they would share the agent's network with no proxy and no decision; debug a copy of the pod outside the namespace instead";

/// Whether the update adds an ephemeral container (the apiserver only adds
/// them, through the `pods/ephemeralcontainers` subresource).
fn ephemeral_added(old: Option<&Pod>, new: &Pod) -> bool {
    let count = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.ephemeral_containers.as_ref())
            .map_or(0, Vec::len)
    };
    count(new) > old.map_or(0, count)
}

// ------------------------------------------------------------------ namespaces

/// The opt-in is protected: an update that takes `mandate.dev/enforce=true`
/// off a namespace (removes the label or changes its value) is refused while
/// pods Mandate injected are not terminated there, since they would keep
/// running with nothing guarding them. There is no override: whoever may edit
/// the namespace could set it too. Read live, so a read error is a refusal.
impl Validate<Namespace> for WebhookState {
    type Review = Namespace;
    const WEBHOOK: &'static str = "validate-namespaces";
    async fn validate(&self, req: &AdmissionRequest<Namespace>) -> AdmissionResponse {
        let (Operation::Update, Some(old), Some(new)) = (&req.operation, &req.old_object, &req.object) else {
            return AdmissionResponse::from(req);
        };
        let enforced = |n: &Namespace| n.labels().get(ENFORCE_LABEL).map(String::as_str) == Some("true");
        if !enforced(old) || enforced(new) {
            return AdmissionResponse::from(req);
        }
        let ns = old.name_any();
        match injected_running(&self.client, &ns).await {
            Ok(pods) if pods.is_empty() => AdmissionResponse::from(req),
            Ok(pods) => deny(req, opt_out_refused(&ns, &pods)),
            Err(why) => deny(req, why),
        }
    }
}

/// The pods in `ns` carrying Mandate's injected marker that have not
/// terminated (phase neither Succeeded nor Failed), asked of the apiserver.
async fn injected_running(client: &Client, ns: &str) -> Result<Vec<String>, String> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let list = tokio::time::timeout(LIVE_READ_TIMEOUT, api.list(&Default::default()))
        .await
        .map_err(|_| format!("Mandate's operator could not list the pods of namespace {ns} in time; retry shortly"))?
        .map_err(|e| format!("Mandate's operator could not list the pods of namespace {ns} ({e}); retry shortly"))?;
    let mut names: Vec<String> = list
        .items
        .iter()
        .filter(|p| p.annotations().contains_key(mandate_api::names::INJECTED_ANNOTATION))
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .map(ResourceExt::name_any)
        .collect();
    names.sort();
    Ok(names)
}

fn opt_out_refused(ns: &str, pods: &[String]) -> String {
    let shown: Vec<&str> = pods.iter().take(5).map(String::as_str).collect();
    let more = if pods.len() > shown.len() {
        format!(" and {} more", pods.len() - shown.len())
    } else {
        String::new()
    };
    format!(
        "namespace {ns} has {} running agent pod(s) Mandate injected ({}{more}); removing or changing {ENFORCE_LABEL}=true would leave them running unguarded. Delete the agent pods (scale their workloads to zero) or move them out of the namespace first, then change the label",
        pods.len(),
        shown.join(", ")
    )
}

// ------------------------------------------------------------------ policies and identities

impl Validate<AgentPolicy> for WebhookState {
    type Review = DynamicObject;
    const WEBHOOK: &'static str = "validate-agentpolicies";
    async fn validate(&self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let (Operation::Create | Operation::Update, Some(obj)) = (&req.operation, &req.object) else {
            return AdmissionResponse::from(req);
        };
        let p: AgentPolicy = match parse(obj, "AgentPolicy") {
            Ok(p) => p,
            Err(why) => return deny(req, why),
        };
        let spec = p.spec;
        // Credentials first (refused outright when brokering is off), their
        // reviews beside the compile.
        if !self.credential_brokering
            && let Err(why) = brokered::refuse_when_off(&spec)
        {
            return deny(req, why);
        }
        let accesses = brokered::accesses(&spec);
        let ns = req
            .namespace
            .clone()
            .or_else(|| p.metadata.namespace.clone())
            .unwrap_or_default();
        let reviews = async {
            if accesses.is_empty() {
                Ok(())
            } else {
                brokered::review(&self.client, &ns, &req.user_info, accesses).await
            }
        };
        let work = tokio::task::spawn_blocking(move || validate::policy(&spec));
        let (reviewed, checked) = tokio::join!(reviews, tokio::time::timeout(POLICY_DEADLINE, work));
        if let Err(why) = reviewed {
            return deny(req, why);
        }
        match checked {
            Ok(Ok(Ok(()))) => AdmissionResponse::from(req),
            Ok(Ok(Err(why))) => deny(req, why),
            Ok(Err(e)) => deny(req, format!("checking the policy failed: {e}")),
            Err(_) => deny(
                req,
                format!(
                    "compiling and testing the policy took longer than {}s; make it smaller or its tests cheaper",
                    POLICY_DEADLINE.as_secs()
                ),
            ),
        }
    }
}

impl Validate<AgentIdentity> for WebhookState {
    type Review = DynamicObject;
    const WEBHOOK: &'static str = "validate-agentidentities";
    async fn validate(&self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let (Operation::Create | Operation::Update, Some(obj)) = (&req.operation, &req.object) else {
            return AdmissionResponse::from(req);
        };
        let id: AgentIdentity = match parse(obj, "AgentIdentity") {
            Ok(id) => id,
            Err(why) => return deny(req, why),
        };
        let ns = req.namespace.clone().unwrap_or_default();
        let name = id.name_any();
        let others: Vec<_> = self
            .identities
            .state()
            .iter()
            .filter(|i| i.metadata.namespace.as_deref() == Some(ns.as_str()))
            .filter_map(|i| i.parsed.as_ref().ok().map(|p| (i.name_any(), p.spec.clone())))
            .collect();
        match validate::identity(&name, &ns, &id.spec, &self.trust_domain, &others) {
            Ok(()) => AdmissionResponse::from(req),
            Err(why) => deny(req, why),
        }
    }
}

// ------------------------------------------------------------------ approvals

/// The old and the new approval of an update.
fn approvals(req: &AdmissionRequest<DynamicObject>) -> Result<(AgentApproval, AgentApproval), String> {
    match (&req.old_object, &req.object) {
        (Some(old), Some(new)) => Ok((parse(old, "AgentApproval")?, parse(new, "AgentApproval")?)),
        _ => Err("an update without both objects".into()),
    }
}

impl Mutate<AgentApproval> for WebhookState {
    type Review = DynamicObject;
    const WEBHOOK: &'static str = "mutate-agentapprovals";
    async fn mutate(&self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        if req.operation != Operation::Update {
            return AdmissionResponse::from(req);
        }
        let (old, new) = match approvals(req) {
            Ok(both) => both,
            Err(why) => return deny(req, why),
        };
        let (o, n) = (old.status.unwrap_or_default(), new.status.unwrap_or_default());
        if o.phase == ApprovalPhase::Pending && matches!(n.phase, ApprovalPhase::Approved | ApprovalPhase::Denied) {
            // Record who decided, from the authenticated request,
            // whatever the object claimed.
            let user = req.user_info.username.clone().unwrap_or_default();
            let now = jiff::Timestamp::now().to_string();
            let patch = vec![
                json_patch::PatchOperation::Add(json_patch::AddOperation {
                    path: jsonptr::PointerBuf::from_tokens(["status", "decidedBy"]),
                    value: serde_json::Value::String(user),
                }),
                json_patch::PatchOperation::Add(json_patch::AddOperation {
                    path: jsonptr::PointerBuf::from_tokens(["status", "decidedAt"]),
                    value: serde_json::Value::String(now),
                }),
            ];
            AdmissionResponse::from(req)
                .with_patch(json_patch::Patch(patch))
                .unwrap_or_else(|e| deny(req, format!("Mandate could not encode its patch: {e}")))
        } else {
            AdmissionResponse::from(req)
        }
    }
}

impl Validate<AgentApproval> for WebhookState {
    type Review = DynamicObject;
    const WEBHOOK: &'static str = "validate-agentapprovals";
    async fn validate(&self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        if req.operation != Operation::Update {
            return AdmissionResponse::from(req);
        }
        match approvals(req) {
            Err(why) => deny(req, why),
            Ok((old, new)) => {
                let user = req.user_info.username.clone().unwrap_or_default();
                match validate::approval_update(&old, &new, &user, &self.operator_user) {
                    Ok(()) => AdmissionResponse::from(req),
                    Err(why) => deny(req, why),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use axum::http::Request;
    use tower::ServiceExt as _;

    fn state(metrics: Arc<Metrics>) -> WebhookState {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        WebhookState {
            inject: Arc::new(InjectConfig::default()),
            trust_domain: "example.org".into(),
            operator_namespace: "mandate-system".into(),
            operator_user: "system:serviceaccount:mandate-system:mandate-operator".into(),
            native_sidecars: false,
            credential_brokering: false,
            identities: reflector::store().0,
            namespaces: reflector::store().0,
            synced: Arc::new(true.into()),
            metrics,
            client: Client::try_from(config).unwrap(),
        }
    }

    async fn post(app: Router, path: &str, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
        let req = Request::post(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    fn review(kind: &str, operation: &str, object: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "mandate.dev", "version": "v1alpha1", "kind": kind},
                "resource": {"group": "mandate.dev", "version": "v1alpha1", "resource": "x"},
                "operation": operation,
                "namespace": "agents",
                "userInfo": {"username": "alice"},
                "object": object,
                "dryRun": false
            }
        })
    }

    #[tokio::test]
    async fn every_route_refuses_a_body_that_is_not_a_review_with_400() {
        let metrics = Arc::new(Metrics::default());
        let app = router(state(metrics));
        for path in [
            "/mutate/pods",
            "/validate/pods",
            "/validate/namespaces",
            "/validate/agentpolicies",
            "/validate/agentidentities",
            "/mutate/agentapprovals",
            "/validate/agentapprovals",
        ] {
            let (status, _) = post(app.clone(), path, serde_json::json!({"not": "a review"})).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        }
    }

    #[tokio::test]
    async fn a_malformed_identity_is_denied_with_a_message_and_counted() {
        let metrics = Arc::new(Metrics::default());
        let app = router(state(metrics.clone()));
        let object = serde_json::json!({
            "apiVersion": "mandate.dev/v1alpha1",
            "kind": "AgentIdentity",
            "metadata": {"name": "a", "namespace": "agents"},
            "spec": {"selector": 7}
        });
        let (status, body) = post(
            app.clone(),
            "/validate/agentidentities",
            review("AgentIdentity", "CREATE", object),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["response"]["uid"], "u-1");
        assert_eq!(body["response"]["allowed"], false);
        assert_eq!(body["response"]["status"]["code"], 403);
        let message = body["response"]["status"]["message"].as_str().unwrap();
        assert!(message.starts_with("this is not a valid AgentIdentity: "), "{message}");
        let denied = crate::admin::AdmissionLabels {
            webhook: "validate-agentidentities",
            result: "denied",
        };
        assert_eq!(metrics.admissions.get_or_create(&denied).get(), 1);

        // A delete is allowed, and counted as such.
        let (_, body) = post(
            app,
            "/validate/agentapprovals",
            review("AgentApproval", "DELETE", serde_json::Value::Null),
        )
        .await;
        assert_eq!(body["response"]["allowed"], true);
        let allowed = crate::admin::AdmissionLabels {
            webhook: "validate-agentapprovals",
            result: "allowed",
        };
        assert_eq!(metrics.admissions.get_or_create(&allowed).get(), 1);
    }
}
