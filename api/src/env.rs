//! The sidecar's environment: what the injector writes and the sidecar's
//! arguments read.
//!
//! Every environment variable `mandate-sidecar` reads is named here once
//! (the sidecar's `Args` use these constants as their `env`), and
//! [`SidecarEnv`] is what the injector writes: it builds one and sets
//! exactly its [`SidecarEnv::pairs`] on the sidecar container. A test in
//! the sidecar crate parses a fully populated `SidecarEnv` with the
//! sidecar's own arguments, so the two sides cannot drift apart.

use std::net::SocketAddr;

/// Policy files or directories (`--policy`).
pub const MANDATE_POLICY: &str = "MANDATE_POLICY";
/// ext_authz's TCP address (`--listen`).
pub const MANDATE_LISTEN: &str = "MANDATE_LISTEN";
/// ext_authz's unix socket (`--listen-unix`).
pub const MANDATE_LISTEN_UNIX: &str = "MANDATE_LISTEN_UNIX";
/// No TCP listener (`--no-tcp`).
pub const MANDATE_NO_TCP: &str = "MANDATE_NO_TCP";
/// Which evaluator runs policies (`--engine`).
pub const MANDATE_ENGINE: &str = "MANDATE_ENGINE";
/// /livez, /readyz and /metrics (`--admin-listen`).
pub const MANDATE_ADMIN_LISTEN: &str = "MANDATE_ADMIN_LISTEN";
/// Longest one evaluation may run (`--eval-timeout-ms`).
pub const MANDATE_EVAL_TIMEOUT_MS: &str = "MANDATE_EVAL_TIMEOUT_MS";
/// Largest body policy may inspect (`--max-body-bytes`).
pub const MANDATE_MAX_BODY_BYTES: &str = "MANDATE_MAX_BODY_BYTES";
/// More headers to redact in the decision log (`--redact-header`).
pub const MANDATE_REDACT_HEADERS: &str = "MANDATE_REDACT_HEADERS";
/// How often policy files are re-read (`--reload-interval-ms`).
pub const MANDATE_RELOAD_INTERVAL_MS: &str = "MANDATE_RELOAD_INTERVAL_MS";
/// The agent's SPIFFE ID (`--agent-spiffe-id`).
pub const MANDATE_AGENT_SPIFFE_ID: &str = "MANDATE_AGENT_SPIFFE_ID";
/// The agent's AgentIdentity (`--agent-identity`).
pub const MANDATE_AGENT_IDENTITY: &str = "MANDATE_AGENT_IDENTITY";
/// The agent pod's namespace (`--agent-namespace`).
pub const MANDATE_AGENT_NAMESPACE: &str = "MANDATE_AGENT_NAMESPACE";
/// The agent pod's name (`--agent-pod`).
pub const MANDATE_AGENT_POD: &str = "MANDATE_AGENT_POD";
/// The agent pod's service account (`--agent-service-account`).
pub const MANDATE_AGENT_SERVICE_ACCOUNT: &str = "MANDATE_AGENT_SERVICE_ACCOUNT";
/// The operator's SVID signing service (`--svid-server`).
pub const MANDATE_SVID_SERVER: &str = "MANDATE_SVID_SERVER";
/// The projected service-account token (`--svid-token-file`).
pub const MANDATE_SVID_TOKEN_FILE: &str = "MANDATE_SVID_TOKEN_FILE";
/// The trust bundle file (`--trust-bundle-file`).
pub const MANDATE_TRUST_BUNDLE_FILE: &str = "MANDATE_TRUST_BUNDLE_FILE";
/// The trust domain (`--trust-domain`).
pub const MANDATE_TRUST_DOMAIN: &str = "MANDATE_TRUST_DOMAIN";
/// The SPIFFE ID the operator presents (`--operator-spiffe-id`).
pub const MANDATE_OPERATOR_SPIFFE_ID: &str = "MANDATE_OPERATOR_SPIFFE_ID";
/// Where SVIDs come from (`--identity-source`).
pub const MANDATE_IDENTITY_SOURCE: &str = "MANDATE_IDENTITY_SOURCE";
/// The SPIFFE Workload API socket (`--spiffe-endpoint-socket`); the name
/// SPIFFE's own libraries read.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";
/// The operator's policy service (`--policy-server`).
pub const MANDATE_POLICY_SERVER: &str = "MANDATE_POLICY_SERVER";
/// Threads deciding requests (`--workers`).
pub const MANDATE_WORKERS: &str = "MANDATE_WORKERS";
/// The diagnostics filter (`--log`).
pub const MANDATE_LOG: &str = "MANDATE_LOG";
/// The DNS resolver's addresses, comma-separated (`--dns-listen`).
pub const MANDATE_DNS_LISTEN: &str = "MANDATE_DNS_LISTEN";
/// The nameservers allowed names are forwarded to (`--dns-upstream`).
pub const MANDATE_DNS_UPSTREAM: &str = "MANDATE_DNS_UPSTREAM";
/// The cluster's DNS domain, always resolved (`--dns-cluster-domain`).
pub const MANDATE_DNS_CLUSTER_DOMAIN: &str = "MANDATE_DNS_CLUSTER_DOMAIN";

/// The SDS unix socket interception leaves are served on (`--sds-socket`).
pub const MANDATE_SDS_SOCKET: &str = "MANDATE_SDS_SOCKET";
/// Where the pod CA and the trust bundle are published (`--ca-bundle-dir`).
pub const MANDATE_CA_BUNDLE_DIR: &str = "MANDATE_CA_BUNDLE_DIR";
/// The system roots put in the bundle (`--system-roots`).
pub const MANDATE_SYSTEM_ROOTS: &str = "MANDATE_SYSTEM_ROOTS";
/// The pod CA's lifetime (`--ca-lifetime-hours`).
pub const MANDATE_CA_LIFETIME_HOURS: &str = "MANDATE_CA_LIFETIME_HOURS";
/// An interception leaf's lifetime (`--leaf-lifetime-seconds`).
pub const MANDATE_LEAF_LIFETIME_SECONDS: &str = "MANDATE_LEAF_LIFETIME_SECONDS";
/// The bound on names holding a leaf (`--max-intercepted-names`).
pub const MANDATE_MAX_INTERCEPTED_NAMES: &str = "MANDATE_MAX_INTERCEPTED_NAMES";

/// Every environment variable the sidecar reads.
pub const SIDECAR_ENV_NAMES: [&str; 34] = [
    MANDATE_POLICY,
    MANDATE_LISTEN,
    MANDATE_LISTEN_UNIX,
    MANDATE_NO_TCP,
    MANDATE_ENGINE,
    MANDATE_ADMIN_LISTEN,
    MANDATE_EVAL_TIMEOUT_MS,
    MANDATE_MAX_BODY_BYTES,
    MANDATE_REDACT_HEADERS,
    MANDATE_RELOAD_INTERVAL_MS,
    MANDATE_AGENT_SPIFFE_ID,
    MANDATE_AGENT_IDENTITY,
    MANDATE_AGENT_NAMESPACE,
    MANDATE_AGENT_POD,
    MANDATE_AGENT_SERVICE_ACCOUNT,
    MANDATE_SVID_SERVER,
    MANDATE_SVID_TOKEN_FILE,
    MANDATE_TRUST_BUNDLE_FILE,
    MANDATE_TRUST_DOMAIN,
    MANDATE_OPERATOR_SPIFFE_ID,
    MANDATE_IDENTITY_SOURCE,
    SPIFFE_ENDPOINT_SOCKET,
    MANDATE_POLICY_SERVER,
    MANDATE_WORKERS,
    MANDATE_LOG,
    MANDATE_DNS_LISTEN,
    MANDATE_DNS_UPSTREAM,
    MANDATE_DNS_CLUSTER_DOMAIN,
    MANDATE_SDS_SOCKET,
    MANDATE_CA_BUNDLE_DIR,
    MANDATE_SYSTEM_ROOTS,
    MANDATE_CA_LIFETIME_HOURS,
    MANDATE_LEAF_LIFETIME_SECONDS,
    MANDATE_MAX_INTERCEPTED_NAMES,
];

/// Where X.509-SVIDs come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum IdentitySource {
    /// The operator's built-in CA: sidecars prove their pod with a projected
    /// service-account token and get their SVID signed by the operator.
    #[default]
    Builtin,
    /// SPIRE: every workload (sidecars and the operator) gets its SVID and
    /// bundle from the SPIFFE Workload API socket.
    Spire,
}

impl IdentitySource {
    /// The value as written in configuration and the environment (what
    /// serde and the command line accept).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::Spire => "spire",
        }
    }
}

/// A field of the pod, resolved by the kubelet (the downward API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PodField {
    /// `metadata.namespace`.
    Namespace,
    /// `metadata.name`.
    Name,
    /// `spec.serviceAccountName`.
    ServiceAccountName,
}

impl PodField {
    /// The field's path, as a `fieldRef` names it.
    pub fn path(self) -> &'static str {
        match self {
            Self::Namespace => "metadata.namespace",
            Self::Name => "metadata.name",
            Self::ServiceAccountName => "spec.serviceAccountName",
        }
    }
}

/// The value of one environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    /// This value (a container env's `value`).
    Literal(String),
    /// A field of the pod (a container env's `valueFrom.fieldRef`).
    Field(PodField),
}

impl EnvValue {
    fn literal(value: impl ToString) -> Self {
        Self::Literal(value.to_string())
    }
}

/// What the injector tells the sidecar of an agent pod, one field per
/// setting; [`SidecarEnv::pairs`] is its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarEnv {
    /// `MANDATE_POLICY`: the policy directory (the mounted ConfigMap).
    pub policy: String,
    /// `MANDATE_LISTEN_UNIX`: ext_authz's unix socket.
    pub listen_unix: String,
    /// `MANDATE_NO_TCP`: serve ext_authz on the unix socket only.
    pub no_tcp: bool,
    /// `MANDATE_ADMIN_LISTEN`: /livez, /readyz and /metrics.
    pub admin_listen: SocketAddr,
    /// `MANDATE_EVAL_TIMEOUT_MS`.
    pub eval_timeout_ms: u64,
    /// `MANDATE_MAX_BODY_BYTES`.
    pub max_body_bytes: u64,
    /// `MANDATE_AGENT_NAMESPACE`.
    pub agent_namespace: EnvValue,
    /// `MANDATE_AGENT_POD`.
    pub agent_pod: EnvValue,
    /// `MANDATE_AGENT_SERVICE_ACCOUNT`.
    pub agent_service_account: EnvValue,
    /// `MANDATE_AGENT_IDENTITY`: the AgentIdentity selecting the pod.
    pub agent_identity: Option<String>,
    /// Where the sidecar's SVID comes from, and what goes with it.
    pub identity: SidecarIdentity,
    /// `MANDATE_AGENT_SPIFFE_ID`: the agent's SPIFFE ID.
    pub agent_spiffe_id: Option<String>,
    /// `MANDATE_DNS_LISTEN`: the DNS resolver's addresses, comma-separated
    /// socket addresses (`127.0.0.1:15053,[::1]:15053`); no resolver when
    /// `None` (transparent egress off).
    pub dns_listen: Option<String>,
    /// `MANDATE_DNS_CLUSTER_DOMAIN`: the cluster's DNS domain (names under
    /// it always resolve); the sidecar's default (`cluster.local`) when
    /// `None`.
    pub dns_cluster_domain: Option<String>,
    /// TLS interception: the SDS socket and where the pod CA is published
    /// (`--sds-socket`, `--ca-bundle-dir`); none when it is off.
    pub interception: Option<(String, String)>,
}

/// The sidecar's SVID source, and the settings that come with it. A policy
/// service needs an SVID, so only the variants with one name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SidecarIdentity {
    /// No SVID (the sidecar reads policy files and denies nothing for want
    /// of one).
    None,
    /// The operator's built-in CA.
    Builtin(BuiltinIdentity),
    /// The SPIFFE Workload API (SPIRE).
    Spire(SpireIdentity),
}

/// The built-in CA's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltinIdentity {
    /// `MANDATE_SVID_SERVER`: the operator's signing service.
    pub svid_server: String,
    /// `MANDATE_TRUST_DOMAIN`.
    pub trust_domain: String,
    /// `MANDATE_SVID_TOKEN_FILE`: the projected service-account token.
    pub svid_token_file: String,
    /// `MANDATE_TRUST_BUNDLE_FILE`.
    pub trust_bundle_file: String,
    /// `MANDATE_POLICY_SERVER`: the operator's policy service, if used.
    pub policy_server: Option<String>,
}

/// SPIRE's settings (`MANDATE_IDENTITY_SOURCE=spire`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpireIdentity {
    /// `SPIFFE_ENDPOINT_SOCKET`: the Workload API (`unix:///path`).
    pub spiffe_endpoint_socket: String,
    /// `MANDATE_TRUST_DOMAIN`.
    pub trust_domain: String,
    /// `MANDATE_OPERATOR_SPIFFE_ID`: the SPIFFE ID the operator presents.
    pub operator_spiffe_id: Option<String>,
    /// `MANDATE_POLICY_SERVER`: the operator's policy service, if used.
    pub policy_server: Option<String>,
}

impl SidecarEnv {
    /// Every name [`SidecarEnv::pairs`] can write.
    pub const NAMES: [&str; 23] = [
        MANDATE_POLICY,
        MANDATE_LISTEN_UNIX,
        MANDATE_NO_TCP,
        MANDATE_ADMIN_LISTEN,
        MANDATE_EVAL_TIMEOUT_MS,
        MANDATE_MAX_BODY_BYTES,
        MANDATE_AGENT_NAMESPACE,
        MANDATE_AGENT_POD,
        MANDATE_AGENT_SERVICE_ACCOUNT,
        MANDATE_AGENT_IDENTITY,
        MANDATE_IDENTITY_SOURCE,
        SPIFFE_ENDPOINT_SOCKET,
        MANDATE_SVID_SERVER,
        MANDATE_TRUST_DOMAIN,
        MANDATE_SVID_TOKEN_FILE,
        MANDATE_TRUST_BUNDLE_FILE,
        MANDATE_OPERATOR_SPIFFE_ID,
        MANDATE_POLICY_SERVER,
        MANDATE_AGENT_SPIFFE_ID,
        MANDATE_DNS_LISTEN,
        MANDATE_DNS_CLUSTER_DOMAIN,
        MANDATE_SDS_SOCKET,
        MANDATE_CA_BUNDLE_DIR,
    ];

    /// The environment, in the order the container lists it (the order is
    /// part of the injection's digest: keep it).
    pub fn pairs(&self) -> Vec<(&'static str, EnvValue)> {
        let mut env = vec![
            (MANDATE_POLICY, EnvValue::literal(&self.policy)),
            (MANDATE_LISTEN_UNIX, EnvValue::literal(&self.listen_unix)),
            (MANDATE_NO_TCP, EnvValue::literal(self.no_tcp)),
            (MANDATE_ADMIN_LISTEN, EnvValue::literal(self.admin_listen)),
            (MANDATE_EVAL_TIMEOUT_MS, EnvValue::literal(self.eval_timeout_ms)),
            (MANDATE_MAX_BODY_BYTES, EnvValue::literal(self.max_body_bytes)),
            (MANDATE_AGENT_NAMESPACE, self.agent_namespace.clone()),
            (MANDATE_AGENT_POD, self.agent_pod.clone()),
            (MANDATE_AGENT_SERVICE_ACCOUNT, self.agent_service_account.clone()),
        ];
        if let Some(id) = &self.agent_identity {
            env.push((MANDATE_AGENT_IDENTITY, EnvValue::literal(id)));
        }
        match &self.identity {
            SidecarIdentity::None => {}
            SidecarIdentity::Spire(spire) => {
                env.push((
                    MANDATE_IDENTITY_SOURCE,
                    EnvValue::literal(IdentitySource::Spire.as_str()),
                ));
                env.push((SPIFFE_ENDPOINT_SOCKET, EnvValue::literal(&spire.spiffe_endpoint_socket)));
                env.push((MANDATE_TRUST_DOMAIN, EnvValue::literal(&spire.trust_domain)));
                if let Some(id) = &spire.operator_spiffe_id {
                    env.push((MANDATE_OPERATOR_SPIFFE_ID, EnvValue::literal(id)));
                }
                if let Some(server) = &spire.policy_server {
                    env.push((MANDATE_POLICY_SERVER, EnvValue::literal(server)));
                }
            }
            SidecarIdentity::Builtin(builtin) => {
                env.push((MANDATE_SVID_SERVER, EnvValue::literal(&builtin.svid_server)));
                env.push((MANDATE_TRUST_DOMAIN, EnvValue::literal(&builtin.trust_domain)));
                env.push((MANDATE_SVID_TOKEN_FILE, EnvValue::literal(&builtin.svid_token_file)));
                env.push((MANDATE_TRUST_BUNDLE_FILE, EnvValue::literal(&builtin.trust_bundle_file)));
                if let Some(server) = &builtin.policy_server {
                    env.push((MANDATE_POLICY_SERVER, EnvValue::literal(server)));
                }
            }
        }
        if let Some(id) = &self.agent_spiffe_id {
            env.push((MANDATE_AGENT_SPIFFE_ID, EnvValue::literal(id)));
        }
        if let Some(listen) = &self.dns_listen {
            env.push((MANDATE_DNS_LISTEN, EnvValue::literal(listen)));
        }
        if let Some(domain) = &self.dns_cluster_domain {
            env.push((MANDATE_DNS_CLUSTER_DOMAIN, EnvValue::literal(domain)));
        }
        if let Some((socket, dir)) = &self.interception {
            env.push((MANDATE_SDS_SOCKET, EnvValue::literal(socket)));
            env.push((MANDATE_CA_BUNDLE_DIR, EnvValue::literal(dir)));
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn full(identity: SidecarIdentity) -> SidecarEnv {
        SidecarEnv {
            policy: "/p".into(),
            listen_unix: "/s".into(),
            no_tcp: true,
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 15020)),
            eval_timeout_ms: 50,
            max_body_bytes: 1024,
            agent_namespace: EnvValue::Field(PodField::Namespace),
            agent_pod: EnvValue::Field(PodField::Name),
            agent_service_account: EnvValue::Field(PodField::ServiceAccountName),
            agent_identity: Some("x".into()),
            identity,
            agent_spiffe_id: Some("spiffe://e/x".into()),
            dns_listen: Some("127.0.0.1:15053".into()),
            dns_cluster_domain: Some("c.example".into()),
            interception: Some(("/s.sock".into(), "/ca".into())),
        }
    }

    #[test]
    fn names_are_every_name_pairs_write_and_all_are_read() {
        let builtin = full(SidecarIdentity::Builtin(BuiltinIdentity {
            svid_server: "https://op".into(),
            trust_domain: "e".into(),
            svid_token_file: "/t".into(),
            trust_bundle_file: "/b".into(),
            policy_server: Some("https://op:1".into()),
        }));
        let spire = full(SidecarIdentity::Spire(SpireIdentity {
            spiffe_endpoint_socket: "unix:///s".into(),
            trust_domain: "e".into(),
            operator_spiffe_id: Some("spiffe://e/op".into()),
            policy_server: Some("https://op:1".into()),
        }));
        let written: BTreeSet<&str> = [builtin, spire]
            .iter()
            .flat_map(|e| e.pairs().into_iter().map(|(n, _)| n))
            .collect();
        let names: BTreeSet<&str> = SidecarEnv::NAMES.into_iter().collect();
        assert_eq!(written, names);
        assert_eq!(names.len(), SidecarEnv::NAMES.len(), "no name twice");
        let all: BTreeSet<&str> = SIDECAR_ENV_NAMES.into_iter().collect();
        assert_eq!(all.len(), SIDECAR_ENV_NAMES.len(), "no name twice");
        assert!(names.is_subset(&all));
    }

    #[test]
    fn identity_source_strings_are_serdes() {
        for s in [IdentitySource::Builtin, IdentitySource::Spire] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
