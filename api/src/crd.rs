//! Mandate's custom resources: group `mandate.dev`, version `v1alpha1`.
//!
//! The spec and status types are plain serde structs, which the sidecar reads
//! policies with. The `kube` feature adds the `CustomResource` wrappers
//! (`AgentPolicy`, `AgentIdentity`, `AgentApproval`) and the CRDs, for the
//! operator and the CLI.
//!
//! Every field carries a doc comment: it becomes the field's `description` in
//! the CRD schema and so what `kubectl explain` shows. `crds/` holds the YAML
//! these types generate (`make crds`);
//! a test fails when the two differ.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::meta::{Condition, LabelSelector, LabelSelectorRequirement, Time};

/// The API group of every Mandate resource.
pub const GROUP: &str = "mandate.dev";
/// The one version served so far.
pub const VERSION: &str = "v1alpha1";
/// The Rego rule a policy is evaluated at unless it names another.
/// Why an AgentIdentity whose selector selects by absence is refused (the
/// CRD's own rule, the admission webhook and the controller say the same).
pub const SELECTS_BY_ABSENCE: &str = "spec.selector selects pods by what they lack (it is empty, or has only NotIn and DoesNotExist): it would make every other pod in the namespace this agent; select the agent's pods by a label they carry (matchLabels, In or Exists)";
pub const DEFAULT_ENTRYPOINT: &str = "data.mandate.authz.decision";

// ---------------------------------------------------------------- AgentPolicy

/// Rego policy that decides the outbound requests of the agents it binds.
///
/// Each request an agent makes is evaluated against the policy's modules and
/// data at its entrypoint; the result allows, denies or escalates it. Anything
/// but an allow — including an error, a timeout or no policy at all — denies.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "mandate.dev",
        version = "v1alpha1",
        kind = "AgentPolicy",
        doc = "Rego policy deciding the outbound requests of the agents it binds; anything but an allow denies.",
        plural = "agentpolicies",
        shortname = "apol",
        category = "mandate",
        namespaced,
        status = "AgentPolicyStatus",
        printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
        printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.shortVersion"}"#,
        printcolumn = r#"{"name":"In force","type":"string","jsonPath":".status.inForce"}"#,
        printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "size(self.modules) > 0", "message": "spec.modules needs at least one Rego module"},
    {"rule": "self.entrypoint.startsWith('data.')", "message": "spec.entrypoint names a rule under data, e.g. data.mandate.authz.decision"},
]))]
pub struct AgentPolicySpec {
    /// Which agent pods this policy binds, by their labels, in the policy's
    /// namespace. Combined with `identities`: a pod is bound when either
    /// matches. With neither set, the policy binds no pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_selector: Option<LabelSelector>,

    /// Names of AgentIdentity resources in this namespace whose pods this
    /// policy binds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,

    /// Enforce: the decision is carried out. DryRun: the decision is logged
    /// and never carried out, to try a policy on live traffic first. An agent
    /// bound only to DryRun policies is denied everything, as with no policy.
    #[serde(default)]
    pub mode: PolicyMode,

    /// The Rego modules of the policy. Errors name the module, line and
    /// column. Write them with `import rego.v1`.
    pub modules: Vec<RegoModule>,

    /// A JSON object available to the modules as `data` (merged at the root,
    /// beside the modules' packages), e.g. allow-lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub data: Option<serde_json::Value>,

    /// The rule evaluated for each request. Its value is a boolean or an
    /// object `{allow, escalate, reason, http_status, headers, body}`.
    #[serde(default = "default_entrypoint")]
    pub entrypoint: String,

    /// Rego test modules, like `opa test`'s: every rule whose name starts
    /// with `test_` must be true. They see the policy's modules and data.
    /// The operator runs them before a version is Ready; `mandate test` runs
    /// them locally.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<RegoModule>,

    /// The destinations the agents may be steered to, with how Envoy reaches
    /// them. Requests to other hosts are still decided, on host and port only
    /// when they are encrypted end to end. At most 256 (a bound the
    /// apiserver needs to cost the CEL rule on each host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub egress: Vec<EgressDestination>,
}

fn default_entrypoint() -> String {
    DEFAULT_ENTRYPOINT.to_string()
}

/// Whether a policy's decisions are carried out.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PolicyMode {
    /// Decisions are carried out: a deny blocks the request.
    #[default]
    Enforce,
    /// Decisions are logged and every request is allowed.
    DryRun,
}

/// One Rego source file.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct RegoModule {
    /// The module's name, as errors and the decision log refer to it (e.g.
    /// `authz.rego`). Unique within the policy.
    pub name: String,
    /// The Rego source.
    pub rego: String,
}

/// A destination agents may reach, and how.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.credential) || !self.host.startsWith('*')", "message": "a brokered credential needs an exact host: under a wildcard the agent would choose the name (another tenant's, under a shared suffix) it is sent to"},
]))]
pub struct EgressDestination {
    /// Host name (exact, or `*.example.com` for its subdomains).
    #[schemars(length(max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self != '' && !self.contains('/') && !self.contains(':')", "message": "a host name alone: no scheme, port or path (the port has its own field)"},
    ]))]
    pub host: String,
    /// TCP port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Whether Envoy originates TLS to the destination, so that requests to
    /// it are seen whole (method, path, headers, body) by policy.
    #[serde(default)]
    pub tls: bool,
    /// How TLS from the agent to this destination is handled at the pod's
    /// egress. Intercept (the default): Envoy terminates it with a leaf
    /// certificate for the name, issued by the pod's own CA (which the
    /// agent's containers trust), so that policy sees each request (method,
    /// path, headers, body), and re-originates TLS to the verified real
    /// upstream. Passthrough: for clients that pin certificates; the TLS is
    /// never decrypted and the connection is decided on the SNI only. A host
    /// any policy in force declares Passthrough is never intercepted.
    #[serde(default)]
    pub tls_mode: TlsMode,
    /// Whether content read from this destination is trusted. Reading from an
    /// untrusted destination taints the agent's session, and policy can
    /// refuse sensitive actions to tainted sessions.
    #[serde(default)]
    pub trust: TrustClass,
    /// A credential Mandate adds to each allowed request to this destination,
    /// so that the agent never holds it: the sidecar puts it into the request
    /// after the decision, inside TLS (intercepted, or originated by Envoy),
    /// and never into a denied one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<BrokeredCredential>,
}

/// A credential the sidecar adds to allowed requests to one destination.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.secretKeyRef) != has(self.serviceAccountToken)", "message": "name exactly one source: secretKeyRef or serviceAccountToken"},
    {"rule": "!(has(self.header) && has(self.queryParameter))", "message": "the credential goes into a header or a query parameter, not both"},
]))]
pub struct BrokeredCredential {
    /// A key of a Secret in the policy's own namespace. The Secret must carry
    /// the label `mandate.dev/brokered: "true"` (the operator reads no other
    /// Secret), and whoever applies the policy must be allowed to `get` it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
    /// A short-lived token for a service account in the policy's namespace,
    /// minted by the operator with TokenRequest, bound to the agent's pod,
    /// and renewed before it expires. Kubernetes binds a token only to a pod
    /// of its own service account, so name the account the agent's pods run
    /// as (with `automountServiceAccountToken: false` they hold no token
    /// themselves); for a pod of another account it is unavailable. Whoever
    /// applies the policy must be allowed to `create` `serviceaccounts/token`
    /// for that account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_token: Option<ServiceAccountTokenSource>,
    /// The request header the credential goes into (default `Authorization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub header: Option<String>,
    /// A query parameter the credential goes into instead of a header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub query_parameter: Option<String>,
    /// Written before the value (default `Bearer ` for the `Authorization`
    /// header, nothing otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub prefix: Option<String>,
    /// What happens when the agent sends a value of its own in that header
    /// (or parameter), or an `Authorization` header: Drop (the default; the
    /// agent's value is removed and never forwarded) or Deny (the request is
    /// denied).
    #[serde(default)]
    pub agent_supplied: AgentSupplied,
}

/// A key of a Secret in the policy's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in its `data`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A TokenRequest token for a service account in the policy's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountTokenSource {
    /// The service account whose RBAC the agent acts with, per decision.
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: String,
    /// How long each token is valid (600 to 86400; default 600). The
    /// operator renews it at half its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 600, max = 86400))]
    pub expiration_seconds: Option<i64>,
    /// The token's audiences (default: the API server's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
}

/// What happens to a credential the agent sends itself to a brokered host.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AgentSupplied {
    /// Removed before the request is forwarded.
    #[default]
    Drop,
    /// The request is denied.
    Deny,
}

impl BrokeredCredential {
    /// The header the credential goes into, lower case (`None`: a query parameter).
    pub fn header_name(&self) -> Option<String> {
        match (&self.header, &self.query_parameter) {
            (_, Some(_)) => None,
            (Some(h), None) => Some(h.to_ascii_lowercase()),
            (None, None) => Some("authorization".into()),
        }
    }

    /// What is written before the value.
    pub fn value_prefix(&self) -> String {
        match &self.prefix {
            Some(p) => p.clone(),
            None if self.header_name().as_deref() == Some("authorization") => "Bearer ".into(),
            None => String::new(),
        }
    }
}

/// How TLS to a destination is handled at the pod's egress.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TlsMode {
    /// Terminated by Envoy with a leaf from the pod's CA: each request is
    /// decided whole, then TLS is re-originated upstream.
    #[default]
    Intercept,
    /// Never decrypted (for clients that pin certificates): decided on the
    /// SNI only.
    Passthrough,
}

/// How far content from a destination is trusted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TrustClass {
    /// Content from here may steer later actions.
    Trusted,
    /// Content from here taints the session (the default: trust is declared, not assumed).
    #[default]
    Untrusted,
}

/// What the operator last made of an AgentPolicy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `sha256:<hex>` over a canonical form of the modules, data,
    /// entrypoint, mode and egress: the same policy always has the same
    /// version, and every decision is logged with the version that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The first 12 hex digits of `version`, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_version: Option<String>,
    /// `Compiled` (the modules and data compile), `Tested` (every test
    /// passes), `Ready` (this version can be enforced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec of `version`: what sidecars are sent while a newer spec
    /// does not compile or fails its tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub last_good_spec: Option<serde_json::Value>,
    /// `<in force>/<bound>`: how many sidecars of the agents this policy
    /// binds report running `version` (e.g. `3/3`); wait on it to know a
    /// change is enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_force: Option<String>,
    /// Sidecars bound to this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_sidecars: Option<i32>,
    /// Of those, how many run `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars_in_force: Option<i32>,
}

// ---------------------------------------------------------------- AgentIdentity

/// An agent: which pods are it, the SPIFFE ID they act as, and who is
/// accountable for it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "mandate.dev",
        version = "v1alpha1",
        kind = "AgentIdentity",
        doc = "An agent: which pods are it, the SPIFFE ID they act as, and who answers for it.",
        plural = "agentidentities",
        shortname = "aid",
        category = "mandate",
        namespaced,
        status = "AgentIdentityStatus",
        printcolumn = r#"{"name":"SPIFFE ID","type":"string","jsonPath":".status.spiffeId"}"#,
        printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.boundPods"}"#,
        printcolumn = r#"{"name":"Unmediated","type":"integer","jsonPath":".status.unmediatedPods"}"#,
        printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.selector.matchLabels) && size(self.selector.matchLabels) > 0) || (has(self.selector.matchExpressions) && self.selector.matchExpressions.exists(e, e.operator == 'In' || e.operator == 'Exists'))", "message": "spec.selector selects pods by what they lack (it is empty, or has only NotIn and DoesNotExist): it would make every other pod in the namespace this agent; select the agent's pods by a label they carry (matchLabels, In or Exists)"},
    {"rule": "!has(self.spiffeIdTemplate) || self.spiffeIdTemplate.startsWith('spiffe://')", "message": "spec.spiffeIdTemplate must be a spiffe:// URI, e.g. spiffe://{trustDomain}/ns/{namespace}/agent/{name}"},
    {"rule": "!has(self.svidTtl) || self.svidTtl.matches('^[0-9]+[smh]$')", "message": "spec.svidTtl is a duration like 10m, 1h or 90s"},
]))]
pub struct AgentIdentitySpec {
    /// The pods that are this agent, by their labels, in this namespace.
    pub selector: LabelSelector,

    /// The SPIFFE ID the agent's pods get. `{trustDomain}`, `{namespace}` and
    /// `{name}` are replaced; the result must be in the cluster's trust domain,
    /// under `/ns/<this namespace>/`, and no other identity's. The default is
    /// `spiffe://{trustDomain}/ns/{namespace}/agent/{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id_template: Option<String>,

    /// Lifetime of the agent's X.509-SVIDs, as a duration (`10m`, `1h`);
    /// rotated at half life. Default 10m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svid_ttl: Option<String>,

    /// Who launched this agent and answers for what it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<Principal>,

    /// Names of AgentIdentities this agent may invoke.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub may_invoke: Vec<String>,

    /// Names of AgentIdentities this agent accepts delegated requests from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept_delegation_from: Vec<String>,
}

/// The accountable principal behind an agent.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Principal {
    /// What kind of principal it is.
    pub kind: PrincipalKind,
    /// Its name: a user name, a workflow's name, or `namespace/name` of a
    /// ServiceAccount.
    pub name: String,
}

/// Kinds of accountable principal.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PrincipalKind {
    /// A person.
    Human,
    /// An automated workflow (a pipeline, a scheduled job).
    Workflow,
    /// A Kubernetes ServiceAccount.
    ServiceAccount,
}

/// What the operator last made of an AgentIdentity.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentityStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The agent's SPIFFE ID, resolved from the template and the trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// How many pods the selector matches now that Mandate mediates
    /// (injected, in an enforced namespace).
    #[serde(default)]
    pub bound_pods: i32,
    /// How many pods the selector matches that Mandate does not mediate:
    /// never injected (created before the namespace was enforced, or while
    /// the webhooks were away), or in a namespace that is not enforced.
    /// They run with no proxy and no decision, and are not counted as bound.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unmediated_pods: i32,
    /// The names of the first unmediated pods (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmediated: Vec<String>,
    /// `Ready` (the SPIFFE ID resolved and the selector is valid).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The pods that obtained an X.509-SVID as this agent, and when: the
    /// latest issue per pod, written by the operator's CA.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub svids: Vec<SvidIssue>,
    /// What each pod's sidecar acknowledged enforcing: the policy set the
    /// operator sent it on its mTLS stream (the ack names only the set's
    /// version; the policies are the operator's record of that set). Written
    /// by the operator's policy service (its own field manager), one entry
    /// per existing pod; AgentPolicy `status.inForce` counts from it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sidecars: Vec<SidecarAck>,
    /// What the agent's pods still hold that Mandate does not broker, and
    /// how broad their service accounts' RBAC is: what to move to brokered
    /// credentials. Recomputed with the pod count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posture: Option<AgentPosture>,
}

/// An agent's credential posture.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPosture {
    /// Long-lived credentials its pods hold: Secrets mounted or in their
    /// environment, an automounted service-account token.
    #[serde(default)]
    pub held_credentials: Vec<String>,
    /// The broad permissions its service accounts have, by
    /// SubjectAccessReview over a fixed list of probes (cluster-admin,
    /// Secrets, pod creation and exec, token minting, role binding,
    /// impersonation, editing AgentPolicies).
    #[serde(default)]
    pub broad_rbac: Vec<String>,
    /// The destinations the policies bound to this agent declare (in its
    /// namespace, by identity or by its pods' labels), and whether Mandate
    /// brokers a credential for each: a host that is not brokered is one
    /// the agent reaches with whatever it holds itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressPosture>,
}

/// One destination an agent's policies declare.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressPosture {
    /// Host name (exact, or `*.example.com`).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether a policy bound to the agent brokers a credential for it.
    pub brokered: bool,
}

/// A sidecar's latest acknowledged policy set.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarAck {
    /// The pod's name.
    pub pod: String,
    /// The pod's UID: an entry counts only for the very pod it was written for.
    pub pod_uid: String,
    /// The `set_version` the operator sent and the sidecar acknowledged.
    pub set_version: String,
    /// `namespace/name=version` of each policy in that set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_force: Vec<String>,
    /// When the ack was recorded.
    pub acked_at: Time,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// One pod's latest X.509-SVID.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SvidIssue {
    /// The pod's name.
    pub pod: String,
    /// When the SVID was issued.
    pub issued_at: Time,
    /// When it expires (it is renewed at half-life).
    pub expires_at: Time,
}

// ---------------------------------------------------------------- AgentApproval

/// A human decision on one action a policy escalated. Approving is an update
/// of `status` that RBAC controls, so kubectl and GitOps both work.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource))]
#[cfg_attr(feature = "kube", kube(
    group = "mandate.dev",
    version = "v1alpha1",
    kind = "AgentApproval",
    doc = "A human decision on one action a policy escalated.",
    plural = "agentapprovals",
    shortname = "aapr",
    category = "mandate",
    namespaced,
    status = "AgentApprovalStatus",
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".spec.agent"}"#,
    printcolumn = r#"{"name":"Method","type":"string","jsonPath":".spec.action.method"}"#,
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.action.host"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".spec.expiresAt"}"#,
    // On the whole object, so that removing the status (which the status
    // rules cannot see) does not reopen a decision.
    validation = kube::core::Rule::new(
        "!has(oldSelf.status) || (has(self.status) && (oldSelf.status.phase == 'Pending' || self.status == oldSelf.status))"
    ).message("this approval was already decided; a decision cannot change or be removed")
))]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "an AgentApproval's spec cannot change; only its decision (status.phase) can"},
]))]
pub struct AgentApprovalSpec {
    /// The AgentIdentity (in this namespace) whose action this is.
    pub agent: String,
    /// The action, as the policy saw it.
    pub action: ActionFingerprint,
    /// Why the policy escalated it.
    pub reason: String,
    /// The AgentPolicy that escalated it.
    pub policy: String,
    /// That policy's `status.version` when it escalated.
    pub policy_version: String,
    /// After this time the approval is void and the action stays denied.
    pub expires_at: Time,
}

/// What identifies an action for approval.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionFingerprint {
    /// HTTP method (`CONNECT` for an encrypted tunnel).
    pub method: String,
    /// Destination host.
    pub host: String,
    /// Request path, when the request was seen whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The MCP tool called, when the request was an MCP `tools/call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_tool: Option<String>,
}

/// The decision on an approval.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "oldSelf.phase == 'Pending' || self == oldSelf", "message": "this approval was already decided; a decision cannot change"},
    {"rule": "!(self.phase in ['Approved', 'Denied']) || (has(self.decidedBy) && has(self.decidedAt))", "message": "an Approved or Denied approval records status.decidedBy and status.decidedAt"},
    {"rule": "self.phase != 'Pending' || (!has(self.decidedBy) && !has(self.decidedAt))", "message": "status.decidedBy and status.decidedAt are set by Mandate with a decision, not on a Pending approval"},
]))]
pub struct AgentApprovalStatus {
    /// Pending until someone decides; Expired once `expiresAt` passes undecided.
    #[serde(default)]
    pub phase: ApprovalPhase,
    /// Who decided, from the request's authenticated user (never from the object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// When it was decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Time>,
}

/// Phases of an approval.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ApprovalPhase {
    /// Nobody has decided yet.
    #[default]
    Pending,
    /// Approved: the action may go ahead (once, before expiry).
    Approved,
    /// Denied: the action stays denied.
    Denied,
    /// Nobody decided before `expiresAt`.
    Expired,
}

/// Schema of a free-form JSON object (kept as given, any fields).
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

// ---------------------------------------------------------------- documents

/// An AgentPolicy as a YAML file or the policy stream holds it, read without
/// a Kubernetes client (what the sidecar and `mandate test` load).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDocument {
    /// `mandate.dev/v1alpha1` (not checked: files without it load, as before).
    #[serde(default)]
    pub api_version: String,
    /// `AgentPolicy` (the loader checks it).
    #[serde(default)]
    pub kind: String,
    /// The name and namespace (other metadata is ignored here).
    #[serde(default)]
    pub metadata: DocumentMeta,
    /// The policy.
    pub spec: AgentPolicySpec,
}

/// The part of `metadata` a policy document is known by.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct DocumentMeta {
    /// `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `metadata.namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl PolicyDocument {
    /// A document for `spec` named `name` (in `namespace`, if any).
    pub fn new(name: &str, namespace: Option<&str>, spec: AgentPolicySpec) -> Self {
        Self {
            api_version: format!("{GROUP}/{VERSION}"),
            kind: "AgentPolicy".into(),
            metadata: DocumentMeta {
                name: Some(name.into()),
                namespace: namespace.map(Into::into),
            },
            spec,
        }
    }
}
