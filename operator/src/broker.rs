//! Brokered credentials (issue 16), the operator's side: the values the
//! policy stream sends a sidecar for the destinations its policies declare
//! a `credential` on, so that the sidecar adds them to allowed requests and
//! the agent never holds them.
//!
//! - Secrets: only those labelled `mandate.dev/brokered: "true"` are watched
//!   (a label-selected watch in every namespace; RBAC cannot select by
//!   label, so the selector is this code's promise). A Secret a policy
//!   names that is not in that cache is read for its metadata only, to tell
//!   a missing Secret from one that did not opt in; its data never reaches
//!   the operator. The credential's version is the Secret's resourceVersion.
//! - Service-account tokens: a TokenRequest for the account in the policy's
//!   namespace, bound to the subscribing pod (it dies with the pod), cached
//!   per pod and request, renewed at half its life. Its version is its
//!   expiry. Kubernetes binds a token to a pod only for the account the pod
//!   runs as, so that is the account a policy can broker to it: the agent's
//!   own, run with `automountServiceAccountToken: false`, acts with its RBAC
//!   only through decided requests. For another account the credential is
//!   unavailable and says so (an unbound token would outlive the pod).
//!
//! Whoever applies a policy must be allowed to read what it brokers; the
//! AgentPolicy webhook checks that (SubjectAccessReview), so the operator
//! never brokers what the policy's author could not read (no confused
//! deputy). No value is ever logged, nor printed by a `Debug`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::PostParams;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use mandate_api::crd::{AgentSupplied, BrokeredCredential, EgressDestination, SecretKeyRef, ServiceAccountTokenSource};
use mandate_api::names::BROKERED_LABEL;
use mandate_proto::policy::v1::Credential;
use tokio::time::Instant;

/// Why every credential is unavailable when brokering is not enabled.
pub const OFF: &str = "credential brokering is off in this installation (helm value credentialBrokering.enabled)";

/// Why the credentials of a policy sent at its last good version are withheld.
pub const NOT_CURRENT: &str = "the policy's current spec has not passed compile and tests, and only a current spec (whose credentials admission checked) brokers: its last good version is enforced without credentials";

/// Default life of a brokered service-account token (the API's minimum is 600).
pub const DEFAULT_TOKEN_SECONDS: i64 = 600;

/// How long a TokenRequest may take before the credential is unavailable.
const TOKEN_REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// After a failed TokenRequest, the next attempt (the account may be
/// created, or its RBAC fixed, meanwhile; nothing else would wake us).
const TOKEN_RETRY: Duration = Duration::from_secs(30);

/// How long why a named Secret is not brokered (missing, unlabelled) is
/// remembered: every stream re-asks on every change, and a cluster's worth
/// of pods naming a missing Secret must not each read it every time.
const WHY_NO_SECRET_TTL: Duration = Duration::from_secs(10);

/// The pod a set is for: its tokens are bound to it.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub name: String,
    pub uid: String,
    /// The service account it runs as (`default` when unset): the only one
    /// whose tokens Kubernetes binds to it.
    pub service_account: String,
}

/// One cached TokenRequest: per pod, account and request.
#[derive(Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    pod_uid: String,
    namespace: String,
    account: String,
    expiration_seconds: i64,
    audiences: Vec<String>,
}

/// What came of a TokenRequest.
#[derive(Clone)]
enum Minted {
    Token {
        value: String,
        /// The token's expirationTimestamp (RFC 3339): its version.
        expires: jiff::Timestamp,
        renew_at: Instant,
    },
    Failed {
        reason: String,
        /// `None`: asking again cannot help (the pod's account differs).
        retry_at: Option<Instant>,
    },
}

impl Minted {
    /// When the entry must be replaced (`None`: never).
    fn due(&self) -> Option<Instant> {
        match self {
            Minted::Token { renew_at, .. } => Some(*renew_at),
            Minted::Failed { retry_at, .. } => *retry_at,
        }
    }
}

/// The labelled Secrets and the minted tokens.
pub struct Broker {
    client: Client,
    secrets: Store<Secret>,
    tokens: Mutex<HashMap<TokenKey, Minted>>,
    /// `(namespace, name)` → why it is not brokered, and until when that is kept.
    why_not: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the values.
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

/// What is kept of a brokered Secret: its name, namespace, labels,
/// resourceVersion and data (no annotations: kubectl's last-applied copy
/// would be a second copy of the values).
fn slim_secret(s: &mut Secret) {
    crate::lenient::slim_meta(&mut s.metadata);
    s.metadata.annotations = None;
    s.string_data = None;
}

impl Broker {
    /// Start the watch of labelled Secrets in every namespace; `on_change`
    /// runs on each of its events (the distributor re-sends its sets).
    pub fn start(client: Client, on_change: impl Fn() + Send + 'static) -> Arc<Self> {
        let (secrets, writer) = reflector::store();
        let selector = format!("{BROKERED_LABEL}=true");
        tokio::spawn(
            reflector::reflector(
                writer,
                watcher(
                    Api::<Secret>::all(client.clone()),
                    watcher::Config::default().labels(&selector),
                )
                .default_backoff()
                .modify(slim_secret),
            )
            .for_each(move |e| {
                match e {
                    Ok(_) => on_change(),
                    Err(e) => tracing::warn!(error = %watch_error(&e), "brokered Secret watch failed; retrying"),
                }
                async {}
            }),
        );
        Arc::new(Self {
            client,
            secrets,
            tokens: Mutex::default(),
            why_not: Mutex::default(),
        })
    }

    /// The Secret watch has listed once.
    pub async fn ready(&self) -> bool {
        self.secrets.wait_until_ready().await.is_ok()
    }

    /// Forget the tokens minted for a pod (its last stream ended).
    pub fn forget_pod(&self, pod_uid: &str) {
        if let Ok(mut t) = self.tokens.lock() {
            t.retain(|k, _| k.pod_uid != pod_uid);
        }
    }

    /// The credential of `dest` (declared by the policy `policy`, in `ns`)
    /// for `pod`, and when it must be fetched again (a token's half-life, a
    /// failed TokenRequest's retry).
    pub async fn credential(
        &self,
        ns: &str,
        policy: &str,
        dest: &EgressDestination,
        cred: &BrokeredCredential,
        pod: &PodRef,
    ) -> (Credential, Option<Instant>) {
        let mut out = shape(policy, dest, cred);
        let mut due = None;
        match (&cred.secret_key_ref, &cred.service_account_token) {
            (Some(r), None) => {
                out.source = secret_source(ns, r);
                match self.secret_value(ns, r).await {
                    Ok((value, version)) => {
                        out.value = value;
                        out.version = version;
                    }
                    Err(why) => out.unavailable = why,
                }
            }
            (None, Some(t)) => {
                out.source = token_source(ns, t);
                let minted = self.token(ns, t, pod).await;
                due = minted.due();
                match minted {
                    Minted::Token { value, expires, .. } => {
                        out.value = value.into_bytes();
                        out.version = expires.to_string();
                        out.expires_unix = expires.as_second();
                    }
                    Minted::Failed { reason, .. } => out.unavailable = reason,
                }
            }
            // The CRD's rule admits neither; an object written around it is refused here.
            _ => {
                out.unavailable =
                    "the credential must name exactly one source: secretKeyRef or serviceAccountToken".into()
            }
        }
        (out, due)
    }

    /// The value and resourceVersion of key `r.key` of the labelled Secret
    /// `ns/r.name`; else why there is none.
    async fn secret_value(&self, ns: &str, r: &SecretKeyRef) -> Result<(Vec<u8>, String), String> {
        let secret = self.secrets.get(&ObjectRef::new(&r.name).within(ns));
        let Some(secret) = secret else {
            return Err(self.why_no_secret(ns, &r.name).await);
        };
        let data = secret.data.clone().unwrap_or_default();
        match data.get(&r.key) {
            Some(v) if !v.0.is_empty() => Ok((
                v.0.clone(),
                secret.metadata.resource_version.clone().unwrap_or_default(),
            )),
            Some(_) => Err(format!("key {} of Secret {ns}/{} is empty", r.key, r.name)),
            // The reason reaches the agent in its deny: the Secret's other
            // keys are not named.
            None => Err(format!(
                "Secret {ns}/{} has no key {}; fix secretKeyRef.key or the Secret",
                r.name, r.key
            )),
        }
    }

    /// Why `ns/name` is not among the labelled Secrets: asked of the
    /// apiserver for its metadata only (never its data).
    async fn why_no_secret(&self, ns: &str, name: &str) -> String {
        let key = (ns.to_string(), name.to_string());
        let now = Instant::now();
        let cached = self.why_not.lock().ok().and_then(|m| {
            m.get(&key)
                .filter(|(_, until)| *until > now)
                .map(|(why, _)| why.clone())
        });
        if let Some(why) = cached {
            return why;
        }
        let why = self.ask_why_no_secret(ns, name).await;
        if let Ok(mut m) = self.why_not.lock() {
            m.retain(|_, (_, until)| *until > now);
            m.insert(key, (why.clone(), now + WHY_NO_SECRET_TTL));
        }
        why
    }

    async fn ask_why_no_secret(&self, ns: &str, name: &str) -> String {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        match api.get_metadata_opt(name).await {
            Ok(None) => format!("Secret {ns}/{name} does not exist"),
            Ok(Some(m))
                if m.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(BROKERED_LABEL))
                    .map(String::as_str)
                    == Some("true") =>
            {
                format!("Secret {ns}/{name} is not loaded by the operator yet; it is sent once it is")
            }
            Ok(Some(_)) => format!(
                "Secret {ns}/{name} lacks the label {BROKERED_LABEL}=true: the operator reads only Secrets that opt in; \
                 label it (kubectl label secret -n {ns} {name} {BROKERED_LABEL}=true)"
            ),
            Err(e) => format!(
                "Secret {ns}/{name} is not among the Secrets labelled {BROKERED_LABEL}=true the operator reads (asking the apiserver why failed: {})",
                api_message(&e)
            ),
        }
    }

    /// A token for `t` bound to `pod`: the cached one until its half-life,
    /// else a new TokenRequest.
    async fn token(&self, ns: &str, t: &ServiceAccountTokenSource, pod: &PodRef) -> Minted {
        let now = Instant::now();
        if pod.uid.is_empty() {
            return Minted::Failed {
                reason: format!("pod {ns}/{} has no uid to bind a token to", pod.name),
                retry_at: None,
            };
        }
        if pod.service_account != t.service_account_name {
            // Not retried: a pod's service account never changes.
            return Minted::Failed {
                reason: format!(
                    "a token of serviceaccount {ns}/{} cannot be bound to pod {ns}/{}, which runs as {}: Kubernetes binds a token only to a pod of its own service account; \
                     run the agent's pods as {} (with automountServiceAccountToken: false, so that the agent holds no token itself)",
                    t.service_account_name, pod.name, pod.service_account, t.service_account_name
                ),
                retry_at: None,
            };
        }
        let expiration_seconds = t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS);
        let key = TokenKey {
            pod_uid: pod.uid.clone(),
            namespace: ns.to_string(),
            account: t.service_account_name.clone(),
            expiration_seconds,
            audiences: t.audiences.clone(),
        };
        let cached = self.tokens.lock().ok().and_then(|m| m.get(&key).cloned());
        if let Some(m) = cached
            && m.due().is_some_and(|due| due > now)
        {
            return m;
        }
        let minted = self.mint(ns, t, expiration_seconds, pod).await;
        if let Ok(mut m) = self.tokens.lock() {
            // Entries past their due time are replaced on use; drop the long-dead.
            let stale = now.checked_sub(Duration::from_secs(86400)).unwrap_or(now);
            m.retain(|_, v| v.due().is_some_and(|due| due > stale));
            m.insert(key, minted.clone());
        }
        minted
    }

    async fn mint(&self, ns: &str, t: &ServiceAccountTokenSource, expiration_seconds: i64, pod: &PodRef) -> Minted {
        let account = &t.service_account_name;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: t.audiences.clone(),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.name.clone()),
                    uid: Some(pod.uid.clone()),
                }),
                expiration_seconds: Some(expiration_seconds),
            },
            ..TokenRequest::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let started = Instant::now();
        let answer = tokio::time::timeout(
            TOKEN_REQUEST_DEADLINE,
            api.create_token_request(account, &PostParams::default(), &request),
        )
        .await;
        let failed = |why: String| {
            tracing::warn!(serviceaccount = %format!("{ns}/{account}"), pod = %pod.name, reason = %why, "brokered token unavailable");
            Minted::Failed {
                reason: format!("TokenRequest for serviceaccount {ns}/{account} failed: {why}"),
                retry_at: Some(Instant::now() + TOKEN_RETRY),
            }
        };
        match answer {
            Err(_) => failed(format!("no answer within {}s", TOKEN_REQUEST_DEADLINE.as_secs())),
            Ok(Err(e)) => failed(api_message(&e)),
            Ok(Ok(tr)) => match tr.status {
                Some(status) if !status.token.is_empty() => {
                    let expires = status.expiration_timestamp.0;
                    let life = expires.duration_since(jiff::Timestamp::now());
                    let left = Duration::try_from(life).unwrap_or_default();
                    // Renewed at half its life (at least a second from now).
                    let renew_at = started + (left / 2).max(Duration::from_secs(1));
                    tracing::info!(serviceaccount = %format!("{ns}/{account}"), pod = %pod.name, %expires, "brokered token minted");
                    Minted::Token {
                        value: status.token,
                        expires,
                        renew_at,
                    }
                }
                _ => failed("the apiserver answered with no token".into()),
            },
        }
    }
}

/// A watch error as logged: a decoding error's text could quote a Secret's
/// data, so only its kind is said; the others name the request.
fn watch_error(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(kube::Error::SerdeError(_))
        | watcher::Error::WatchStartFailed(kube::Error::SerdeError(_))
        | watcher::Error::WatchFailed(kube::Error::SerdeError(_)) => {
            "a Secret could not be decoded (details withheld: they could quote its data)".into()
        }
        other => other.to_string(),
    }
}

/// A credential's wire form before its value: where it goes and how.
pub fn shape(policy: &str, dest: &EgressDestination, cred: &BrokeredCredential) -> Credential {
    Credential {
        policy: policy.to_string(),
        host: dest.host.clone(),
        port: u32::from(dest.port),
        header: cred.header_name().unwrap_or_default(),
        query_parameter: if cred.header_name().is_none() {
            cred.query_parameter.clone().unwrap_or_default()
        } else {
            String::new()
        },
        prefix: cred.value_prefix(),
        deny_agent_supplied: cred.agent_supplied == AgentSupplied::Deny,
        ..Credential::default()
    }
}

/// A credential that cannot be had at all (brokering off): its shape, its
/// source, and why.
pub fn unavailable(
    ns: &str,
    policy: &str,
    dest: &EgressDestination,
    cred: &BrokeredCredential,
    why: &str,
) -> Credential {
    let mut c = shape(policy, dest, cred);
    c.source = match (&cred.secret_key_ref, &cred.service_account_token) {
        (Some(r), _) => secret_source(ns, r),
        (None, Some(t)) => token_source(ns, t),
        (None, None) => String::new(),
    };
    c.unavailable = why.to_string();
    c
}

fn secret_source(ns: &str, r: &SecretKeyRef) -> String {
    format!("secret {ns}/{} key {}", r.name, r.key)
}

fn token_source(ns: &str, t: &ServiceAccountTokenSource) -> String {
    format!("serviceaccount {ns}/{} token", t.service_account_name)
}

/// The apiserver's own message for an API error, else the error.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dest(cred: serde_json::Value) -> (EgressDestination, BrokeredCredential) {
        let d: EgressDestination =
            serde_json::from_value(json!({"host": "api.example.com", "port": 443, "credential": cred})).unwrap();
        let c = d.credential.clone().unwrap();
        (d, c)
    }

    #[test]
    fn the_wire_shape_follows_the_spec() {
        let (d, c) = dest(json!({"secretKeyRef": {"name": "s", "key": "k"}}));
        let w = shape("ns/p", &d, &c);
        assert_eq!(
            (w.header.as_str(), w.query_parameter.as_str(), w.prefix.as_str()),
            ("authorization", "", "Bearer ")
        );
        assert_eq!(
            (w.host.as_str(), w.port, w.deny_agent_supplied),
            ("api.example.com", 443, false)
        );
        let (d, c) =
            dest(json!({"secretKeyRef": {"name": "s", "key": "k"}, "header": "X-Api-Key", "agentSupplied": "Deny"}));
        let w = shape("ns/p", &d, &c);
        assert_eq!(
            (w.header.as_str(), w.prefix.as_str(), w.deny_agent_supplied),
            ("x-api-key", "", true)
        );
        let (d, c) = dest(json!({"serviceAccountToken": {"serviceAccountName": "sa"}, "queryParameter": "token"}));
        let w = unavailable("ns", "ns/p", &d, &c, OFF);
        assert_eq!((w.header.as_str(), w.query_parameter.as_str()), ("", "token"));
        assert_eq!(w.source, "serviceaccount ns/sa token");
        assert_eq!(w.unavailable, OFF);
        assert!(w.value.is_empty());
    }
}
