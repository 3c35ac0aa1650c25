//! Every name that crosses a boundary between Mandate's parts, or between
//! Mandate and its users: labels, annotations, container and volume names,
//! headers and paths. Each is defined here once; the injector, the operator,
//! the sidecar and the CLI all refer to these.

/// The label that opts a namespace into Mandate (`"true"`).
pub const ENFORCE_LABEL: &str = "mandate.dev/enforce";
/// Label opting a pod in without an AgentIdentity selecting it.
pub const INJECT_LABEL: &str = "mandate.dev/inject";
/// Opt-in label on a Secret: only Secrets with `mandate.dev/brokered: "true"`
/// are read by the operator, to broker them to the agents whose policies name them.
pub const BROKERED_LABEL: &str = "mandate.dev/brokered";

/// Annotation marking a pod as injected (its value: the injection's digest).
pub const INJECTED_ANNOTATION: &str = "mandate.dev/injected";
/// Annotation naming the AgentIdentity the pod was injected as.
pub const IDENTITY_ANNOTATION: &str = "mandate.dev/identity";
/// Annotation listing proxy variables the pod set itself and kept.
pub const PROXY_WARNING_ANNOTATION: &str = "mandate.dev/proxy-env-warning";
/// Annotation choosing the ConfigMap of policy files the sidecar reads
/// (until the operator pushes policies).
pub const POLICY_CONFIGMAP_ANNOTATION: &str = "mandate.dev/policy-configmap";
/// Annotation on the operator's certificate Secrets (the webhook's, the
/// SPIFFE CA's): when the certificate expires.
pub const NOT_AFTER_ANNOTATION: &str = "mandate.dev/not-after";
/// Annotation on the webhook certificate Secret: the names its leaf is for.
pub const SANS_ANNOTATION: &str = "mandate.dev/sans";
/// Label on the Secrets and ConfigMaps the operator writes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// [`MANAGED_BY_LABEL`]'s value, and the operator's field manager.
pub const MANAGED_BY: &str = "mandate-operator";

/// Names of what Mandate injects; a pod may not use them for its own containers.
pub const ENVOY_CONTAINER: &str = "mandate-envoy";
/// The ext_authz sidecar's container.
pub const SIDECAR_CONTAINER: &str = "mandate-sidecar";
/// The init container that installs the pod's egress rules (transparent
/// egress); it runs before anything else in the pod.
pub const INIT_CONTAINER: &str = "mandate-egress-init";
/// The volume holding the authz socket (shared by Envoy and the sidecar).
pub const RUN_VOLUME: &str = "mandate-run";
/// The volume of policy files (ConfigMap mode).
pub const POLICY_VOLUME: &str = "mandate-policies";
/// The sidecar's projected ServiceAccount token (audience `mandate`).
pub const TOKEN_VOLUME: &str = "mandate-token";
/// The trust bundle of the operator's CA.
pub const BUNDLE_VOLUME: &str = "mandate-bundle";
/// SPIRE mode: the SPIFFE CSI driver's volume with the Workload API socket.
pub const SPIFFE_VOLUME: &str = "mandate-spiffe-workload-api";

/// Where the sidecar serves ext_authz in an injected pod.
pub const AUTHZ_SOCKET: &str = "/var/run/mandate/authz.sock";
/// Envoy's admin interface, a unix socket only Envoy's user may open (mode
/// 0600, in a volume no agent container may mount): on a loopback port the
/// agent could reach `/quitquitquit`, `/config_dump` and `/logging`.
pub const ENVOY_ADMIN_SOCKET: &str = "/var/run/mandate/envoy-admin.sock";
/// Where the policy ConfigMap is mounted in the sidecar.
pub const POLICY_DIR: &str = "/etc/mandate/policies";
/// Where the sidecar's projected token is mounted.
pub const SVID_TOKEN_FILE: &str = "/var/run/secrets/mandate/token";
/// Where the operator's trust bundle is mounted.
pub const TRUST_BUNDLE_FILE: &str = "/var/run/mandate-bundle/bundle.pem";

/// Response header naming the decision (its id in the decision log).
pub const DECISION_HEADER: &str = "x-mandate-decision-id";
/// Header the sidecar sets on an allowed request to a destination declared
/// with `tls: true`: Envoy's route table then sends it through the
/// TLS-originating cluster.
pub const UPSTREAM_TLS_HEADER: &str = "x-mandate-upstream-tls";

/// gRPC metadata Envoy puts on its ext_authz calls from the transparent
/// listener, naming the egress path (`http`, `sni`, `raw`); absent from the
/// explicit proxy's. Set by Envoy's bootstrap, out of the agent's reach.
pub const EGRESS_PATH_METADATA: &str = "x-mandate-egress";

/// Response header the sidecar sets on an allowed CONNECT to a TLS
/// destination it intercepts (`intercept`): Envoy then terminates the
/// tunnel into its interception listener instead of tunnelling it. The
/// agent's own is removed before anything decides.
pub const TLS_MODE_HEADER: &str = "x-mandate-tls";

/// Request header Envoy's transparent path adds to the CONNECT it makes of
/// a captured TLS connection: the original destination (`ip:port`). Only
/// that internal listener's requests carry it; the agent's own is removed.
pub const ORIGINAL_DST_HEADER: &str = "x-mandate-original-dst";

/// Request header Envoy's interception listener adds to each request inside
/// intercepted TLS: the authority of the CONNECT that was decided and led
/// there (carried as filter state across the internal hop), so the request
/// must go where that CONNECT said. The agent's own is removed.
pub const CONNECT_AUTHORITY_HEADER: &str = "x-mandate-connect-authority";

/// The sidecar's SecretDiscoveryService socket: interception leaves.
pub const SDS_SOCKET: &str = "/var/run/mandate/sds.sock";

/// Volume: the pod CA's certificate and the trust bundle (system roots plus
/// the pod CA) the sidecar publishes at start; the agent's containers mount
/// it read-only, nothing else may write it.
pub const CA_VOLUME: &str = "mandate-ca";
/// Where [`CA_VOLUME`] is mounted, in the sidecar and the agent's containers.
pub const CA_DIR: &str = "/var/run/mandate-ca";
/// The trust bundle in [`CA_DIR`]: the system roots and the pod CA.
pub const CA_BUNDLE_FILE: &str = "/var/run/mandate-ca/bundle.crt";
/// The pod CA's certificate alone in [`CA_DIR`].
pub const POD_CA_FILE: &str = "/var/run/mandate-ca/ca.crt";
