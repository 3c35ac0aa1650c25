//! `mandate.identity.v1.Identity`: the operator signs an X.509-SVID for a
//! sidecar once it has proven, with its pod's projected service-account
//! token, which pod it runs in, and that pod is an agent. Every refusal has
//! a reason, in the answer and in a log line; nothing is signed on doubt.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use mandate_api::names::ENFORCE_LABEL;
use mandate_proto::identity::v1::identity_server::Identity;
use mandate_proto::identity::v1::{GetTrustBundleRequest, SignSvidRequest, SignSvidResponse, TrustBundle};
use tonic::{Request, Response, Status};

use super::ca::Ca;
use mandate_api::crd::AgentIdentity;

/// The audience a sidecar's projected token must be for.
pub const TOKEN_AUDIENCE: &str = "mandate";
/// SVID lifetime when the AgentIdentity names none.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(600);

/// The identity service.
#[derive(Clone)]
pub struct IdentityService {
    pub client: Client,
    pub ca: Arc<arc_swap::ArcSwap<Ca>>,
    /// The operator's namespace: no pod there is an agent.
    pub operator_namespace: String,
    /// What the injector holds agent pods to (the proxy's UID, for the
    /// isolation checks).
    pub inject: Arc<crate::webhook::inject::InjectConfig>,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService").finish()
    }
}

/// Why an SVID was refused (the message goes back to the sidecar).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Token(String),
    #[error("{0}")]
    Pod(String),
    #[error("{0}")]
    Identity(String),
    #[error("{0}")]
    Csr(String),
    #[error("the operator cannot check this request now: {0}")]
    Unavailable(String),
}

impl IdentityService {
    async fn sign(&self, req: &SignSvidRequest) -> Result<SignSvidResponse, Refusal> {
        if req.token.trim().is_empty() {
            return Err(Refusal::Token("no service-account token in the request".into()));
        }
        // 1. Who is asking: the apiserver verifies the token (signature,
        //    expiry, audience, and that the pod it is bound to still exists).
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(req.token.clone()),
                audiences: Some(vec![TOKEN_AUDIENCE.into()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::Token(format!(
                "the token is not valid: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
            )));
        }
        if !status.audiences.iter().flatten().any(|a| a == TOKEN_AUDIENCE) {
            return Err(Refusal::Token(format!(
                "the token is not for the audience '{TOKEN_AUDIENCE}'"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((ns, sa)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        else {
            return Err(Refusal::Token(format!("{username} is not a service account")));
        };
        let extra = user.extra.unwrap_or_default();
        let claim = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (
            claim("authentication.kubernetes.io/pod-name"),
            claim("authentication.kubernetes.io/pod-uid"),
        ) else {
            return Err(Refusal::Token(
                "the token is not bound to a pod (use the pod's projected service-account token)".into(),
            ));
        };

        // 2. The pod: the very one the token was bound to, running as that
        //    service account.
        let pod = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(&pod_name)
            .await
            .map_err(|e| Refusal::Unavailable(format!("reading pod {ns}/{pod_name}: {e}")))?
            .ok_or_else(|| Refusal::Pod(format!("pod {ns}/{pod_name} does not exist")))?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(Refusal::Pod(format!(
                "pod {ns}/{pod_name} is not the pod the token was issued for (it was deleted and re-created)"
            )));
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(Refusal::Pod(format!("pod {ns}/{pod_name} is being deleted")));
        }
        let pod_sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        if pod_sa != sa {
            return Err(Refusal::Pod(format!(
                "pod {ns}/{pod_name} runs as service account {pod_sa}, not {sa}"
            )));
        }

        // 3. An injected pod in a namespace Mandate enforces, holding the
        //    sidecar's token where only the sidecar can read it: an agent
        //    that projects its own token for this audience (or a pod nobody
        //    guards) gets nothing.
        if ns == "kube-system" || ns == self.operator_namespace {
            return Err(Refusal::Pod(format!("pods in {ns} are never agents")));
        }
        let namespace = Api::<Namespace>::all(self.client.clone())
            .get_opt(ns)
            .await
            .map_err(|e| Refusal::Unavailable(format!("reading namespace {ns}: {e}")))?;
        let enforced = namespace
            .as_ref()
            .is_some_and(|n| n.labels().get(ENFORCE_LABEL).map(String::as_str) == Some("true"));
        if !enforced {
            return Err(Refusal::Pod(format!(
                "namespace {ns} is not labelled {ENFORCE_LABEL}=true: Mandate signs only for agents it enforces"
            )));
        }
        crate::webhook::inject::svid_eligible(&pod, &self.inject).map_err(Refusal::Pod)?;

        // 4. The agent: exactly one AgentIdentity selects the pod.
        let identities = Api::<AgentIdentity>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| Refusal::Unavailable(format!("listing AgentIdentities in {ns}: {e}")))?;
        let labels = pod.labels();
        let selecting: Vec<&AgentIdentity> = identities
            .items
            .iter()
            .filter(|i| mandate_core::binding::selects(&i.spec.selector, labels))
            .collect();
        let identity = match selecting.as_slice() {
            [one] => *one,
            [] => {
                return Err(Refusal::Identity(format!(
                    "no AgentIdentity in {ns} selects pod {pod_name}: it is not an agent"
                )));
            }
            many => {
                return Err(Refusal::Identity(format!(
                    "{} AgentIdentities select pod {ns}/{pod_name}; an agent has exactly one",
                    many.len()
                )));
            }
        };
        let ca = self.ca.load_full();
        let name = identity.name_any();
        let spiffe_id = mandate_core::spiffe_id::spiffe_id(
            identity.spec.spiffe_id_template.as_deref(),
            ca.trust_domain(),
            ns,
            &name,
        )
        .map_err(|e| Refusal::Identity(format!("AgentIdentity {ns}/{name}: {e}")))?;
        // An ID two identities resolve to belongs to neither (IDs are bound
        // to their namespace, so only this namespace's identities can clash).
        let resolved = identities.items.iter().filter_map(|i| {
            let other = i.name_any();
            mandate_core::spiffe_id::spiffe_id(i.spec.spiffe_id_template.as_deref(), ca.trust_domain(), ns, &other)
                .ok()
                .map(|id| (other, id))
        });
        if mandate_core::spiffe_id::sole_owner(&spiffe_id, resolved).as_deref() != Some(name.as_str()) {
            return Err(Refusal::Identity(format!(
                "AgentIdentity {ns}/{name}: another AgentIdentity in {ns} resolves to {spiffe_id} too; a SPIFFE ID names one agent"
            )));
        }
        let ttl = match &identity.spec.svid_ttl {
            Some(t) => Duration::from_secs(
                mandate_core::duration::parse_duration(t)
                    .map_err(|e| Refusal::Identity(format!("AgentIdentity {ns}/{name}: spec.svidTtl: {e}")))?,
            ),
            None => DEFAULT_SVID_TTL,
        };

        // 5. The certificate: built here, carrying exactly that SPIFFE ID.
        let (leaf, not_after) = ca
            .sign_svid(&req.csr, &spiffe_id, ttl)
            .map_err(|e| Refusal::Csr(e.to_string()))?;
        let mut chain = vec![leaf];
        chain.extend(ca.cert_der().map(|c| c.to_vec()));
        self.record(ns, &name, &pod_name, not_after).await;
        tracing::info!(
            pod = %format!("{ns}/{pod_name}"),
            identity = %name,
            %spiffe_id,
            expires = %not_after,
            "X.509-SVID issued"
        );
        Ok(SignSvidResponse {
            cert_chain: chain,
            bundle: ca.bundle_der().into_iter().map(|c| c.to_vec()).collect(),
            spiffe_id,
            identity: name,
            expires_at_unix: not_after.unix_timestamp(),
        })
    }
}

impl IdentityService {
    /// Note the issue in the AgentIdentity's `status.svids` (latest per pod,
    /// expired ones dropped). A failure here is logged; the SVID stands.
    async fn record(&self, ns: &str, identity: &str, pod: &str, not_after: time::OffsetDateTime) {
        use kube::api::{Patch, PatchParams};
        use mandate_api::crd::SvidIssue;
        use mandate_api::meta::Time;
        let api = Api::<AgentIdentity>::namespaced(self.client.clone(), ns);
        let now = jiff::Timestamp::now();
        let current = match api.get_status(identity).await {
            Ok(i) => i.status.map(|s| s.svids).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read AgentIdentity status to record an SVID");
                return;
            }
        };
        let expires = jiff::Timestamp::from_second(not_after.unix_timestamp()).unwrap_or(now);
        let mut svids: Vec<SvidIssue> = current
            .into_iter()
            .filter(|s| s.pod != pod && s.expires_at.0 > now)
            .collect();
        svids.push(SvidIssue {
            pod: pod.into(),
            issued_at: Time(now),
            expires_at: Time(expires),
        });
        svids.sort_by(|a, b| a.pod.cmp(&b.pod));
        let patch = serde_json::json!({
            "apiVersion": "mandate.dev/v1alpha1", "kind": "AgentIdentity",
            "status": {"svids": svids},
        });
        if let Err(e) = api
            .patch_status(
                identity,
                &PatchParams::apply("mandate-operator-ca").force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot record the SVID in the AgentIdentity's status");
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn sign_svid(&self, request: Request<SignSvidRequest>) -> Result<Response<SignSvidResponse>, Status> {
        match self.sign(request.get_ref()).await {
            Ok(r) => Ok(Response::new(r)),
            Err(Refusal::Unavailable(why)) => {
                tracing::warn!(reason = %why, "SVID request could not be checked");
                Err(Status::unavailable(why))
            }
            Err(refusal) => {
                tracing::warn!(reason = %refusal, "SVID refused");
                Err(Status::permission_denied(refusal.to_string()))
            }
        }
    }

    async fn get_trust_bundle(&self, _: Request<GetTrustBundleRequest>) -> Result<Response<TrustBundle>, Status> {
        let ca = self.ca.load_full();
        Ok(Response::new(TrustBundle {
            trust_domain: ca.trust_domain().to_string(),
            certificates: ca.bundle_der().into_iter().map(|c| c.to_vec()).collect(),
        }))
    }
}
