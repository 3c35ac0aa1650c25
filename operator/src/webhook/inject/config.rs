//! How pods are injected, and who the pod is.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use mandate_identity::workload::IdentitySource;
use serde::{Deserialize, Serialize};

/// How pods are injected. Loaded from `--inject-config` (YAML); every field
/// has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct InjectConfig {
    pub envoy_image: String,
    pub sidecar_image: String,
    pub image_pull_policy: String,
    /// Path of the Envoy binary in its image.
    pub envoy_command: String,
    /// Path of mandate-sidecar in its image.
    pub sidecar_command: String,
    /// Path of mandate-egress-init in the sidecar's image (transparent egress).
    pub egress_init_command: String,
    /// Envoy's egress (forward proxy) listener, on loopback.
    pub proxy_port: u16,
    /// Envoy's readiness listener, on the pod IP (for kubelet's probes).
    pub envoy_health_port: u16,
    /// mandate-sidecar's /livez, /readyz and /metrics, on the pod IP.
    pub sidecar_admin_port: u16,
    /// Longest one policy evaluation may run.
    pub eval_timeout_ms: u64,
    /// How long Envoy waits for a decision before denying.
    pub authz_timeout_ms: u64,
    /// Largest request body Envoy buffers for policy to inspect.
    pub max_request_bytes: u32,
    /// CA certificates Envoy verifies TLS-originated upstreams against.
    pub upstream_ca_file: String,
    /// ConfigMap (in the pod's namespace) of AgentPolicy files the sidecar
    /// reads. The admin chooses it, never the pod (a pod that names one
    /// with `mandate.dev/policy-configmap` is refused).
    pub policy_configmap: String,
    /// The operator's SVID signing service (`https://host:port`). When set,
    /// the sidecar gets the pod's projected service-account token for the
    /// audience `mandate` and the trust bundle, and obtains its SVID there.
    pub svid_server: Option<String>,
    /// The operator's policy service (`https://host:port`). When set (with
    /// `svidServer`), the sidecar receives its policies from there instead of
    /// the policy ConfigMap.
    pub policy_server: Option<String>,
    /// The trust domain (for the sidecar's SVID).
    pub trust_domain: String,
    /// ConfigMap (in the pod's namespace; the operator publishes it into
    /// every enforced namespace) holding the trust bundle.
    pub trust_bundle_configmap: String,
    /// Lifetime of the projected token the sidecar proves its pod with.
    pub token_expiration_seconds: i64,
    /// Where sidecars get their X.509-SVIDs: `builtin` (the operator's CA,
    /// with `svidServer`: a projected token and the bundle ConfigMap are
    /// mounted) or `spire` (the SPIFFE Workload API: the SPIFFE CSI driver's
    /// volume is mounted and `SPIFFE_ENDPOINT_SOCKET` set; no token, no
    /// bundle ConfigMap, no signing service).
    pub identity_source: IdentitySource,
    /// SPIRE mode: the CSI driver that mounts the Workload API socket.
    pub spiffe_csi_driver: String,
    /// SPIRE mode: where that volume is mounted in the sidecar.
    pub spiffe_socket_dir: String,
    /// SPIRE mode: the socket's file name in that directory.
    pub spiffe_socket_name: String,
    /// SPIRE mode: the SPIFFE ID the operator's policy service presents
    /// (default `spiffe://<trust domain>/mandate/operator`).
    pub operator_spiffe_id: Option<String>,
    pub envoy_resources: ResourceRequirements,
    pub sidecar_resources: ResourceRequirements,
    /// The proxy's UID: Envoy and mandate-sidecar run as it, it is the only
    /// UID the egress rules exempt, and no agent container may run as it.
    /// Used by nothing else (not 65532, distroless' "nonroot", which agent
    /// images default to).
    pub run_as_user: i64,
    /// Transparent egress: an init container installs nftables rules in the
    /// pod's network namespace that send every TCP connection of every other
    /// UID to Envoy's transparent listener, DNS to the sidecar's resolver,
    /// and drop all other traffic. Needs NET_ADMIN for that one container
    /// (Pod Security `privileged` on the namespace).
    pub transparent_egress: bool,
    /// Envoy's transparent listener (127.0.0.1 and ::1), the target of the
    /// redirect.
    pub transparent_port: u16,
    /// The sidecar's DNS resolver (127.0.0.1 and ::1, UDP and TCP), the target
    /// of port 53's redirect.
    pub dns_port: u16,
    /// The cluster's DNS domain: names under it are always resolved.
    pub cluster_domain: String,
    /// TLS interception: Envoy terminates the agent's TLS to hosts policies
    /// declare `tlsMode: Intercept` with leaves from the pod's own CA (minted
    /// by the sidecar over SDS), decides each request inside, and
    /// re-originates TLS. The agent's containers trust that CA through a
    /// read-only bundle and the usual environment variables.
    pub tls_interception: bool,
}

fn resources(cpu: &str, memory: &str, memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), Quantity(memory_limit.into()))])),
        ..ResourceRequirements::default()
    }
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            envoy_image: "mandate.local/envoy:1.40.0".into(),
            sidecar_image: "mandate.local/sidecar:dev".into(),
            image_pull_policy: "IfNotPresent".into(),
            envoy_command: "/usr/local/bin/envoy".into(),
            sidecar_command: "/usr/local/bin/mandate-sidecar".into(),
            egress_init_command: "/usr/local/bin/mandate-egress-init".into(),
            proxy_port: 15001,
            envoy_health_port: 15021,
            sidecar_admin_port: 15020,
            eval_timeout_ms: 50,
            authz_timeout_ms: 1000,
            max_request_bytes: 1024 * 1024,
            upstream_ca_file: "/etc/ssl/certs/ca-certificates.crt".into(),
            policy_configmap: "mandate-policies".into(),
            svid_server: None,
            policy_server: None,
            trust_domain: "cluster.local".into(),
            trust_bundle_configmap: "mandate-trust-bundle".into(),
            token_expiration_seconds: 600,
            identity_source: IdentitySource::Builtin,
            spiffe_csi_driver: "csi.spiffe.io".into(),
            spiffe_socket_dir: "/spiffe-workload-api".into(),
            spiffe_socket_name: "spire-agent.sock".into(),
            operator_spiffe_id: None,
            envoy_resources: resources("50m", "64Mi", "256Mi"),
            sidecar_resources: resources("20m", "32Mi", "128Mi"),
            run_as_user: 15999,
            transparent_egress: true,
            transparent_port: 15002,
            dns_port: 15053,
            cluster_domain: "cluster.local".into(),
            tls_interception: true,
        }
    }
}

/// Who the pod is, as far as injection is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRef {
    /// The AgentIdentity selecting the pod, if any (opt-in pods may have none).
    pub identity: Option<String>,
    /// Its resolved SPIFFE ID.
    pub spiffe_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_has_a_default_and_unknown_ones_are_refused() {
        let empty: InjectConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(empty, InjectConfig::default());
        let some: InjectConfig = serde_yaml::from_str("identitySource: spire\nproxyPort: 1").unwrap();
        assert_eq!(some.identity_source, IdentitySource::Spire);
        assert_eq!(some.proxy_port, 1);
        assert!(serde_yaml::from_str::<InjectConfig>("proxyPortt: 1").is_err());
    }
}
