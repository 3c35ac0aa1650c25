//! What the pod webhook adds to an agent pod: Envoy as the agent's egress
//! proxy, mandate-sidecar as Envoy's ext_authz, their volumes, and the proxy
//! environment on the agent's containers. Pure functions of the pod and the
//! configuration, so the same pod always gets the same patch.

use mandate_api::names::{
    AUTHZ_SOCKET, BUNDLE_VOLUME, ENVOY_CONTAINER, IDENTITY_ANNOTATION, INJECTED_ANNOTATION,
    POLICY_CONFIGMAP_ANNOTATION, POLICY_VOLUME, PROXY_WARNING_ANNOTATION, RUN_VOLUME, SIDECAR_CONTAINER, SPIFFE_VOLUME,
    TOKEN_VOLUME,
};
use std::collections::BTreeMap;

use json_patch::{AddOperation, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use mandate_identity::workload::IdentitySource;

/// The proxy variables set on the agent's containers (both spellings: tools
/// differ in which they read).
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

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
    /// Envoy's egress (forward proxy) listener, on loopback.
    pub proxy_port: u16,
    /// Envoy's admin, on loopback.
    pub envoy_admin_port: u16,
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
    /// reads, unless the pod's `mandate.dev/policy-configmap` names another.
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
    /// UID the injected containers run as.
    pub run_as_user: i64,
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
            proxy_port: 15001,
            envoy_admin_port: 15000,
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
            run_as_user: 65532,
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

/// Why a pod cannot be injected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("the pod has no containers")]
    NoContainers,
    #[error(
        "the pod uses hostNetwork; Mandate's proxy listens on the pod's loopback and cannot mediate a pod on the node's network"
    )]
    HostNetwork,
    #[error("container name '{0}' is reserved for what Mandate injects; rename the pod's container")]
    ReservedName(String),
    #[error("volume name '{0}' is reserved for what Mandate injects; rename the pod's volume")]
    ReservedVolume(String),
    #[error(
        "the pod carries {INJECTED_ANNOTATION} but its Mandate containers are not the ones Mandate injects ({0}); remove them and the annotation and let the webhook inject"
    )]
    Forged(String),
    #[error("cannot build the patch: {0}")]
    Patch(String),
}

/// The result of injecting a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    pub patch: Vec<PatchOperation>,
    /// Proxy variables the pod set itself (kept, not overridden).
    pub warnings: Vec<String>,
}

/// Whether `pod` already holds Mandate's containers (by name).
fn has_our_containers(pod: &Pod) -> Vec<String> {
    let Some(spec) = &pod.spec else { return vec![] };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| c.name.clone())
        .filter(|n| n == ENVOY_CONTAINER || n == SIDECAR_CONTAINER)
        .collect()
}

/// The two containers and the digest that marks them, for this pod.
pub fn containers(_pod: &Pod, cfg: &InjectConfig, agent: &AgentRef, native_sidecars: bool) -> (Container, Container) {
    let security = SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(cfg.run_as_user),
        run_as_group: Some(cfg.run_as_user),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    };
    let http_probe = |path: &str, port: u16, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(port)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    };
    let run_mount = VolumeMount {
        name: RUN_VOLUME.into(),
        mount_path: "/var/run/mandate".into(),
        ..VolumeMount::default()
    };
    let field = |path: &str| EnvVarSource {
        // As the apiserver defaults it, so the injected pod compares equal.
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            api_version: Some("v1".into()),
        }),
        ..EnvVarSource::default()
    };
    let env = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    };

    let mut envoy = Container {
        name: ENVOY_CONTAINER.into(),
        image: Some(cfg.envoy_image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec![cfg.envoy_command.clone()]),
        args: Some(vec![
            "--config-yaml".into(),
            envoy_bootstrap(cfg),
            "--log-level".into(),
            "warn".into(),
            "--disable-hot-restart".into(),
            "--concurrency".into(),
            "2".into(),
        ]),
        ports: None,
        readiness_probe: Some(http_probe("/healthz/ready", cfg.envoy_health_port, 2, 3)),
        resources: Some(cfg.envoy_resources.clone()),
        security_context: Some(security.clone()),
        volume_mounts: Some(vec![run_mount.clone()]),
        ..Container::default()
    };
    let mut sidecar_env = vec![
        env("MANDATE_POLICY", "/etc/mandate/policies"),
        env("MANDATE_LISTEN_UNIX", AUTHZ_SOCKET),
        env("MANDATE_NO_TCP", "true"),
        env("MANDATE_ADMIN_LISTEN", &format!("0.0.0.0:{}", cfg.sidecar_admin_port)),
        env("MANDATE_EVAL_TIMEOUT_MS", &cfg.eval_timeout_ms.to_string()),
        env("MANDATE_MAX_BODY_BYTES", &cfg.max_request_bytes.to_string()),
        EnvVar {
            name: "MANDATE_AGENT_NAMESPACE".into(),
            value: None,
            value_from: Some(field("metadata.namespace")),
        },
        EnvVar {
            name: "MANDATE_AGENT_POD".into(),
            value: None,
            value_from: Some(field("metadata.name")),
        },
        EnvVar {
            name: "MANDATE_AGENT_SERVICE_ACCOUNT".into(),
            value: None,
            value_from: Some(field("spec.serviceAccountName")),
        },
    ];
    if let Some(id) = &agent.identity {
        sidecar_env.push(env("MANDATE_AGENT_IDENTITY", id));
    }
    let mut sidecar_mounts = vec![
        run_mount.clone(),
        VolumeMount {
            name: POLICY_VOLUME.into(),
            mount_path: "/etc/mandate/policies".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    if cfg.identity_source == IdentitySource::Spire {
        // The SVID and bundle come from the SPIRE agent through the CSI
        // driver's socket; the AgentIdentity name above is checked against
        // the SVID (the sidecar takes only an SVID with the SPIFFE ID below).
        sidecar_env.push(env("MANDATE_IDENTITY_SOURCE", "spire"));
        sidecar_env.push(env(
            "SPIFFE_ENDPOINT_SOCKET",
            &format!(
                "unix://{}/{}",
                cfg.spiffe_socket_dir.trim_end_matches('/'),
                cfg.spiffe_socket_name
            ),
        ));
        sidecar_env.push(env("MANDATE_TRUST_DOMAIN", &cfg.trust_domain));
        if let Some(id) = &cfg.operator_spiffe_id {
            sidecar_env.push(env("MANDATE_OPERATOR_SPIFFE_ID", id));
        }
        if let Some(policy_server) = &cfg.policy_server {
            sidecar_env.push(env("MANDATE_POLICY_SERVER", policy_server));
        }
        sidecar_mounts.push(VolumeMount {
            name: SPIFFE_VOLUME.into(),
            mount_path: cfg.spiffe_socket_dir.clone(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    } else if let Some(server) = &cfg.svid_server {
        sidecar_env.push(env("MANDATE_SVID_SERVER", server));
        sidecar_env.push(env("MANDATE_TRUST_DOMAIN", &cfg.trust_domain));
        sidecar_env.push(env("MANDATE_SVID_TOKEN_FILE", "/var/run/secrets/mandate/token"));
        sidecar_env.push(env("MANDATE_TRUST_BUNDLE_FILE", "/var/run/mandate-bundle/bundle.pem"));
        if let Some(policy_server) = &cfg.policy_server {
            sidecar_env.push(env("MANDATE_POLICY_SERVER", policy_server));
        }
        for (name, path) in [
            (TOKEN_VOLUME, "/var/run/secrets/mandate"),
            (BUNDLE_VOLUME, "/var/run/mandate-bundle"),
        ] {
            sidecar_mounts.push(VolumeMount {
                name: name.into(),
                mount_path: path.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }
    if let Some(id) = &agent.spiffe_id {
        sidecar_env.push(env("MANDATE_AGENT_SPIFFE_ID", id));
    }
    let mut sidecar = Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(cfg.sidecar_image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec![cfg.sidecar_command.clone()]),
        env: Some(sidecar_env),
        readiness_probe: Some(http_probe("/readyz", cfg.sidecar_admin_port, 2, 3)),
        liveness_probe: Some(http_probe("/livez", cfg.sidecar_admin_port, 10, 3)),
        resources: Some(cfg.sidecar_resources.clone()),
        security_context: Some(security),
        volume_mounts: Some(sidecar_mounts),
        ..Container::default()
    };
    if native_sidecars {
        // Native sidecars (Kubernetes >= 1.29): restartable init containers;
        // kubelet starts the next container only once this one's startup
        // probe passes, so the agent starts behind a ready proxy.
        for (c, probe) in [
            (&mut envoy, http_probe("/healthz/ready", cfg.envoy_health_port, 1, 60)),
            (&mut sidecar, http_probe("/readyz", cfg.sidecar_admin_port, 1, 60)),
        ] {
            c.restart_policy = Some("Always".into());
            c.startup_probe = Some(probe);
        }
    } else {
        // Older clusters: ordinary containers, first in the list. kubelet
        // starts containers in order and waits for a postStart hook before
        // the next one, so the agent's containers start only once the
        // sidecar (and, through it, Envoy) answer ready.
        sidecar.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        cfg.sidecar_command.clone(),
                        "--wait-ready".into(),
                        format!(
                            "http://127.0.0.1:{}/readyz,http://127.0.0.1:{}/healthz/ready",
                            cfg.sidecar_admin_port, cfg.envoy_health_port
                        ),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        });
    }
    (envoy, sidecar)
}

fn policy_configmap(pod: &Pod, cfg: &InjectConfig) -> String {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POLICY_CONFIGMAP_ANNOTATION))
        .cloned()
        .unwrap_or_else(|| cfg.policy_configmap.clone())
}

fn volumes(pod: &Pod, cfg: &InjectConfig) -> Vec<Volume> {
    let mut vols = vec![
        Volume {
            name: RUN_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("16Mi".into())),
            }),
            ..Volume::default()
        },
        Volume {
            name: POLICY_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: policy_configmap(pod, cfg),
                // A missing ConfigMap leaves the sidecar without policy: not
                // Ready, and every request denied.
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    if cfg.identity_source == IdentitySource::Spire {
        vols.push(Volume {
            name: SPIFFE_VOLUME.into(),
            csi: Some(CSIVolumeSource {
                driver: cfg.spiffe_csi_driver.clone(),
                read_only: Some(true),
                ..CSIVolumeSource::default()
            }),
            ..Volume::default()
        });
    } else if cfg.svid_server.is_some() {
        vols.push(Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(crate::spiffe::signer::TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(cfg.token_expiration_seconds),
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                default_mode: None,
            }),
            ..Volume::default()
        });
        vols.push(Volume {
            name: BUNDLE_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cfg.trust_bundle_configmap.clone(),
                // Missing: no SVID, so not Ready and every request denied.
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    vols
}

/// Envoy's bootstrap: an HTTP forward proxy on loopback whose every request
/// (CONNECT included) is decided by the sidecar over its unix socket, with
/// `failure_mode_allow: false`. The sidecar's answer steers the request to
/// a plain, a TLS-originating or a tunnelling upstream, so the bootstrap
/// never changes when policies do.
pub fn envoy_bootstrap(cfg: &InjectConfig) -> String {
    envoy_bootstrap_at(cfg, AUTHZ_SOCKET, "0.0.0.0")
}

/// [`envoy_bootstrap`] with the ext_authz socket and the readiness
/// listener's address chosen (tests run it outside a pod).
pub fn envoy_bootstrap_at(cfg: &InjectConfig, authz_socket: &str, health_address: &str) -> String {
    let dfp_cache = json!({
        "name": "egress_dns",
        "dns_lookup_family": "V4_PREFERRED",
        "max_hosts": 4096,
    });
    let dfp_cluster = |name: &str, tls: bool| {
        let mut c = json!({
            "name": name,
            "connect_timeout": "5s",
            "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {
                "name": "envoy.clusters.dynamic_forward_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                    "dns_cache_config": dfp_cache,
                },
            },
        });
        if tls && let Some(m) = c.as_object_mut() {
            m.insert(
                "transport_socket".into(),
                json!({
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "common_tls_context": {
                            "validation_context": {"trusted_ca": {"filename": cfg.upstream_ca_file}},
                        },
                    },
                }),
            );
            m.insert(
                "typed_extension_protocol_options".into(),
                json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "upstream_http_protocol_options": {"auto_sni": true, "auto_san_validation": true},
                        "explicit_http_config": {"http_protocol_options": {}},
                    },
                }),
            );
        }
        c
    };
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": cfg.envoy_admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "egress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": cfg.proxy_port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "egress",
                            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                            "route_config": {
                                "name": "egress",
                                "virtual_hosts": [{
                                    "name": "egress",
                                    "domains": ["*"],
                                    "routes": [
                                        {"match": {"connect_matcher": {}},
                                         "route": {"cluster": "egress_tunnel",
                                                   "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]},
                                         // A tunnel's stream never ends: decide on
                                         // host and port without waiting for a body.
                                         "typed_per_filter_config": {"envoy.filters.http.ext_authz": {
                                             "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                                             "check_settings": {"disable_request_body_buffering": true}}}},
                                        {"match": {"prefix": "/", "headers": [
                                            {"name": mandate_api::names::UPSTREAM_TLS_HEADER, "string_match": {"exact": "true"}}]},
                                         "route": {"cluster": "egress_tls", "timeout": "60s"}},
                                        {"match": {"prefix": "/"},
                                         "route": {"cluster": "egress_plain", "timeout": "60s"}},
                                    ],
                                }],
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.ext_authz",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                                        "transport_api_version": "V3",
                                        "failure_mode_allow": false,
                                        "clear_route_cache": true,
                                        "status_on_error": {"code": 403},
                                        "with_request_body": {"max_request_bytes": cfg.max_request_bytes, "allow_partial_message": true},
                                        "grpc_service": {
                                            "envoy_grpc": {"cluster_name": "mandate_authz"},
                                            "timeout": format!("{}s", cfg.authz_timeout_ms as f64 / 1000.0),
                                        },
                                    },
                                },
                                {
                                    "name": "envoy.filters.http.dynamic_forward_proxy",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                                        "dns_cache_config": dfp_cache,
                                    },
                                },
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                                },
                            ],
                        },
                    }]}],
                },
                {
                    // Readiness for kubelet, answered by Envoy's own /ready;
                    // nothing else is reachable here.
                    "name": "health",
                    "address": {"socket_address": {"address": health_address, "port_value": cfg.envoy_health_port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "health",
                            "route_config": {"virtual_hosts": [{
                                "name": "health",
                                "domains": ["*"],
                                "routes": [{"match": {"path": "/healthz/ready"},
                                            "route": {"cluster": "envoy_admin", "prefix_rewrite": "/ready"}}],
                            }]},
                            "http_filters": [{
                                "name": "envoy.filters.http.router",
                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                            }],
                        },
                    }]}],
                },
            ],
            "clusters": [
                {
                    "name": "mandate_authz",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        },
                    },
                    "load_assignment": {"cluster_name": "mandate_authz", "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": {"pipe": {"path": authz_socket}}}}]}]},
                },
                {
                    "name": "envoy_admin",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": "envoy_admin", "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": cfg.envoy_admin_port}}}}]}]},
                },
                dfp_cluster("egress_plain", false),
                dfp_cluster("egress_tls", true),
                dfp_cluster("egress_tunnel", false),
            ],
        },
    });
    bootstrap.to_string()
}

/// A digest of what is injected for this pod, so a re-invocation (or an
/// already injected pod) is recognised and a forged one is not.
pub fn digest(envoy: &Container, sidecar: &Container, volumes: &[Volume]) -> String {
    use sha2::Digest as _;
    let canonical = json!([envoy, sidecar, volumes]).to_string();
    let hash = sha2::Sha256::digest(canonical.as_bytes());
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn reserved_volume(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .find(|n| [RUN_VOLUME, POLICY_VOLUME, TOKEN_VOLUME, BUNDLE_VOLUME, SPIFFE_VOLUME].contains(&n.as_str()))
}

/// Whether the pod holds exactly what Mandate injects for it now (its
/// marker, both containers as generated, its volumes). Used for re-invoked
/// and already-injected pods, and by the admission guard.
pub fn injected_as_expected(pod: &Pod, cfg: &InjectConfig, agent: &AgentRef, native_sidecars: bool) -> bool {
    injection_difference(pod, cfg, agent, native_sidecars).is_none()
}

/// What differs between the pod and what Mandate injects for it now, if anything.
pub fn injection_difference(pod: &Pod, cfg: &InjectConfig, agent: &AgentRef, native_sidecars: bool) -> Option<String> {
    let Some(spec) = &pod.spec else {
        return Some("the pod has no spec".into());
    };
    let (envoy, sidecar) = containers(pod, cfg, agent, native_sidecars);
    let find = |name: &str| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == name)
    };
    let marker = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECTED_ANNOTATION));
    let want = digest(&envoy, &sidecar, &volumes(pod, cfg));
    if marker != Some(&want) {
        return Some(format!(
            "its {INJECTED_ANNOTATION} is {marker:?}, not {want} (injected by another version or configuration of Mandate?)"
        ));
    }
    // Ours come first in their list: an init container placed before them
    // would run before the proxy exists (native sidecars), and a container
    // before them would start before the postStart hold (the older path).
    let (list, list_name) = if native_sidecars {
        (spec.init_containers.as_deref().unwrap_or_default(), "initContainers")
    } else {
        (spec.containers.as_slice(), "containers")
    };
    let head: Vec<&str> = list.iter().take(2).map(|c| c.name.as_str()).collect();
    if head != [ENVOY_CONTAINER, SIDECAR_CONTAINER] {
        return Some(format!(
            "{ENVOY_CONTAINER} and {SIDECAR_CONTAINER} must be the first two of {list_name}, but they start with {head:?} (if another admission webhook put its containers first, Mandate refuses the pod: anything before its proxy runs unmediated)"
        ));
    }
    // The apiserver defaults fields we leave unset (terminationMessagePath,
    // probe thresholds...), so compare what we set, field by field.
    for ours in [&envoy, &sidecar] {
        let Some(t) = find(&ours.name) else {
            return Some(format!("container {} is missing", ours.name));
        };
        let differs = [
            ("image", t.image != ours.image),
            ("command", t.command != ours.command),
            ("args", t.args != ours.args),
            ("env", t.env != ours.env),
            (
                "volumeMounts",
                !same_mounts(t.volume_mounts.as_deref(), ours.volume_mounts.as_deref()),
            ),
            ("securityContext", t.security_context != ours.security_context),
            ("restartPolicy", t.restart_policy != ours.restart_policy),
            (
                "lifecycle",
                t.lifecycle.as_ref().map(|l| &l.post_start) != ours.lifecycle.as_ref().map(|l| &l.post_start),
            ),
        ];
        if let Some((field, _)) = differs.iter().find(|(_, d)| *d) {
            return Some(format!("container {}'s {field} differs", ours.name));
        }
    }
    None
}

/// Our mounts, plus at most what the apiserver adds itself (the
/// ServiceAccount admission plugin mounts the token into every container,
/// including ours, when it re-runs after the webhook).
fn same_mounts(theirs: Option<&[VolumeMount]>, ours: Option<&[VolumeMount]>) -> bool {
    let (theirs, ours) = (theirs.unwrap_or_default(), ours.unwrap_or_default());
    ours.iter().all(|m| theirs.contains(m))
        && theirs
            .iter()
            .filter(|m| !ours.contains(m))
            .all(|m| m.mount_path.starts_with("/var/run/secrets/") && m.read_only == Some(true))
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn ptr(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

/// The patch that injects `pod`; `Ok(None)` when it already is injected as
/// it would be now (re-invocation, or a pod created twice from one spec).
pub fn inject(
    pod: &Pod,
    cfg: &InjectConfig,
    agent: &AgentRef,
    native_sidecars: bool,
) -> Result<Option<Injection>, InjectError> {
    let spec = pod.spec.as_ref().ok_or(InjectError::NoContainers)?;
    if spec.containers.is_empty() {
        return Err(InjectError::NoContainers);
    }
    if spec.host_network == Some(true) {
        return Err(InjectError::HostNetwork);
    }
    let ours = has_our_containers(pod);
    let marked = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    if marked || !ours.is_empty() {
        let Some(difference) = injection_difference(pod, cfg, agent, native_sidecars) else {
            return Ok(None);
        };
        return Err(match ours.into_iter().next() {
            Some(name) if !marked => InjectError::ReservedName(name),
            _ => InjectError::Forged(difference),
        });
    }
    if let Some(v) = reserved_volume(pod) {
        return Err(InjectError::ReservedVolume(v));
    }

    let (envoy, sidecar) = containers(pod, cfg, agent, native_sidecars);
    let vols = volumes(pod, cfg);
    let to_value = |v: &dyn erased::Ser| v.value().map_err(|e| InjectError::Patch(e.to_string()));
    let mut patch = Vec::new();
    let mut warnings = Vec::new();

    // 1. Proxy variables on the agent's containers (indices before ours are
    //    prepended). A value the pod set itself is kept, with a warning. With
    //    native sidecars the agent's own init containers run after ours, behind
    //    a ready proxy, so they get the variables too; before 1.29 they run
    //    before the proxy exists.
    let proxy = format!("http://127.0.0.1:{}", cfg.proxy_port);
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    let agent_init: &[Container] = match (native_sidecars, spec.init_containers.as_ref()) {
        (true, Some(init)) => init,
        _ => &[],
    };
    let agent_containers = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| ("containers", i, c))
        .chain(agent_init.iter().enumerate().map(|(i, c)| ("initContainers", i, c)));
    for (list, i, c) in agent_containers {
        let idx = i.to_string();
        let mut missing = Vec::new();
        for var in PROXY_VARS {
            let value = if var.eq_ignore_ascii_case("NO_PROXY") {
                no_proxy.clone()
            } else {
                proxy.clone()
            };
            if c.env.iter().flatten().any(|e| e.name == var) {
                warnings.push(format!(
                    "container {} sets {var} itself; Mandate kept its value, so its traffic may not pass through Mandate's proxy",
                    c.name
                ));
            } else {
                missing.push(EnvVar {
                    name: var.into(),
                    value: Some(value),
                    value_from: None,
                });
            }
        }
        if c.env.is_none() {
            patch.push(add(ptr(&["spec", list, &idx, "env"]), to_value(&missing)?));
        } else {
            for e in missing {
                patch.push(add(ptr(&["spec", list, &idx, "env", "-"]), to_value(&e)?));
            }
        }
    }

    // 2. Our containers, first: as native sidecars, or at the head of the
    //    containers list.
    let list = if native_sidecars {
        "initContainers"
    } else {
        "containers"
    };
    let existing = if native_sidecars {
        spec.init_containers.as_ref()
    } else {
        Some(&spec.containers)
    };
    if existing.is_none() {
        patch.push(add(ptr(&["spec", list]), to_value(&vec![&envoy, &sidecar])?));
    } else {
        patch.push(add(ptr(&["spec", list, "0"]), to_value(&envoy)?));
        patch.push(add(ptr(&["spec", list, "1"]), to_value(&sidecar)?));
    }

    // 3. Volumes.
    if spec.volumes.is_none() {
        patch.push(add(ptr(&["spec", "volumes"]), to_value(&vols)?));
    } else {
        for v in &vols {
            patch.push(add(ptr(&["spec", "volumes", "-"]), to_value(v)?));
        }
    }

    // 4. The marker, the identity, and any warning, as annotations.
    let mut notes = BTreeMap::new();
    notes.insert(INJECTED_ANNOTATION.to_string(), digest(&envoy, &sidecar, &vols));
    if let Some(id) = &agent.identity {
        notes.insert(IDENTITY_ANNOTATION.to_string(), id.clone());
    }
    if !warnings.is_empty() {
        notes.insert(PROXY_WARNING_ANNOTATION.to_string(), warnings.join("; "));
    }
    if pod.metadata.annotations.is_none() {
        patch.push(add(ptr(&["metadata", "annotations"]), to_value(&notes)?));
    } else {
        for (k, v) in notes {
            patch.push(add(ptr(&["metadata", "annotations", &k]), Value::String(v)));
        }
    }
    Ok(Some(Injection { patch, warnings }))
}

/// Serialising a patch value without naming its type at each call site.
mod erased {
    pub trait Ser {
        fn value(&self) -> Result<serde_json::Value, serde_json::Error>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> Result<serde_json::Value, serde_json::Error> {
            serde_json::to_value(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(extra: Value) -> Pod {
        let mut p = json!({
            "metadata": {"name": "a", "namespace": "ns", "labels": {"agent": "x"}},
            "spec": {"containers": [{"name": "agent", "image": "agent:1"}, {"name": "helper", "image": "h:1",
                     "env": [{"name": "NO_PROXY", "value": "*"}]}]},
        });
        if let (Some(p), Value::Object(e)) = (p.as_object_mut(), extra) {
            for (k, v) in e {
                p.insert(k, v);
            }
        }
        serde_json::from_value(p).unwrap()
    }

    fn apply(p: &Pod, inj: &Injection) -> Pod {
        let mut v = serde_json::to_value(p).unwrap();
        json_patch::patch(&mut v, &inj.patch).unwrap();
        serde_json::from_value(v).unwrap()
    }

    fn agent() -> AgentRef {
        AgentRef {
            identity: Some("x".into()),
            spiffe_id: Some("spiffe://example.org/ns/ns/agent/x".into()),
        }
    }

    #[test]
    fn injects_before_the_agent_and_is_idempotent() {
        let cfg = InjectConfig::default();
        let p = pod(json!({}));
        let inj = inject(&p, &cfg, &agent(), false).unwrap().unwrap();
        let out = apply(&p, &inj);
        let spec = out.spec.as_ref().unwrap();
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [ENVOY_CONTAINER, SIDECAR_CONTAINER, "agent", "helper"]);
        let env = |c: usize, n: &str| {
            spec.containers[c]
                .env
                .iter()
                .flatten()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(env(2, "HTTP_PROXY").as_deref(), Some("http://127.0.0.1:15001"));
        assert_eq!(env(3, "NO_PROXY").as_deref(), Some("*"), "the pod's own value is kept");
        assert_eq!(inj.warnings.len(), 1, "{:?}", inj.warnings);
        assert!(
            out.metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(PROXY_WARNING_ANNOTATION)
        );
        // Again: nothing to do. Tampered: refused.
        assert_eq!(inject(&out, &cfg, &agent(), false), Ok(None));
        let mut tampered = out.clone();
        tampered.spec.as_mut().unwrap().containers[1].image = Some("evil:1".into());
        assert!(matches!(
            inject(&tampered, &cfg, &agent(), false),
            Err(InjectError::Forged(_))
        ));
        // Another identity's sidecar configuration is not this one's.
        let other = AgentRef {
            identity: Some("y".into()),
            spiffe_id: None,
        };
        assert!(!injected_as_expected(&out, &cfg, &other, false));
    }

    #[test]
    fn spire_mode_mounts_the_workload_api_socket_and_no_token() {
        let spire = InjectConfig {
            identity_source: IdentitySource::Spire,
            trust_domain: "example.org".into(),
            policy_server: Some("https://mandate-operator.mandate-system.svc:9445".into()),
            operator_spiffe_id: Some("spiffe://example.org/spire/mandate-operator".into()),
            // Even if one were configured, SPIRE mode uses no signing service.
            svid_server: Some("https://mandate-operator.mandate-system.svc:9444".into()),
            ..InjectConfig::default()
        };
        let p = pod(json!({}));
        let inj = inject(&p, &spire, &agent(), false).unwrap().unwrap();
        // The volume as the patch writes it.
        let added: Vec<Value> = inj
            .patch
            .iter()
            .filter_map(|op| match op {
                PatchOperation::Add(a) if a.path == "/spec/volumes" => Some(a.value.clone()),
                _ => None,
            })
            .collect();
        let vols = added[0].as_array().unwrap();
        assert!(vols.contains(&json!({"name": SPIFFE_VOLUME, "csi": {"driver": "csi.spiffe.io", "readOnly": true}})));
        assert!(
            vols.iter()
                .all(|v| v.get("projected").is_none() && v["name"] != TOKEN_VOLUME && v["name"] != BUNDLE_VOLUME),
            "no token or bundle ConfigMap in SPIRE mode: {vols:?}"
        );

        let out = apply(&p, &inj);
        let spec = out.spec.as_ref().unwrap();
        let sidecar = spec.containers.iter().find(|c| c.name == SIDECAR_CONTAINER).unwrap();
        let env = |n: &str| {
            sidecar
                .env
                .iter()
                .flatten()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(env("MANDATE_IDENTITY_SOURCE").as_deref(), Some("spire"));
        assert_eq!(
            env("SPIFFE_ENDPOINT_SOCKET").as_deref(),
            Some("unix:///spiffe-workload-api/spire-agent.sock")
        );
        assert_eq!(env("MANDATE_TRUST_DOMAIN").as_deref(), Some("example.org"));
        assert_eq!(
            env("MANDATE_OPERATOR_SPIFFE_ID").as_deref(),
            Some("spiffe://example.org/spire/mandate-operator")
        );
        assert_eq!(
            env("MANDATE_POLICY_SERVER").as_deref(),
            Some("https://mandate-operator.mandate-system.svc:9445")
        );
        // Who the pod is: the sidecar takes only an SVID with this SPIFFE ID.
        assert_eq!(env("MANDATE_AGENT_IDENTITY").as_deref(), Some("x"));
        assert_eq!(
            env("MANDATE_AGENT_SPIFFE_ID").as_deref(),
            Some("spiffe://example.org/ns/ns/agent/x")
        );
        for absent in [
            "MANDATE_SVID_SERVER",
            "MANDATE_SVID_TOKEN_FILE",
            "MANDATE_TRUST_BUNDLE_FILE",
        ] {
            assert_eq!(env(absent), None, "{absent} in SPIRE mode");
        }
        let mounts = sidecar.volume_mounts.as_ref().unwrap();
        assert!(mounts.contains(&VolumeMount {
            name: SPIFFE_VOLUME.into(),
            mount_path: "/spiffe-workload-api".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }));
        assert!(mounts.iter().all(|m| m.name != TOKEN_VOLUME && m.name != BUNDLE_VOLUME));
        // The agent's own containers do not get the socket.
        let agent_c = spec.containers.iter().find(|c| c.name == "agent").unwrap();
        assert!(agent_c.volume_mounts.is_none());

        // Idempotent; and not what the built-in CA mode would inject.
        assert_eq!(inject(&out, &spire, &agent(), false), Ok(None));
        let builtin = InjectConfig {
            identity_source: IdentitySource::Builtin,
            ..spire.clone()
        };
        assert!(!injected_as_expected(&out, &builtin, &agent(), false));
        // A pod bringing its own volume of that name is refused.
        let squat =
            pod(json!({"spec": {"containers": [{"name": "a"}], "volumes": [{"name": SPIFFE_VOLUME, "emptyDir": {}}]}}));
        assert_eq!(
            inject(&squat, &spire, &agent(), false),
            Err(InjectError::ReservedVolume(SPIFFE_VOLUME.into()))
        );
    }

    #[test]
    fn builtin_mode_mounts_the_projected_token_for_the_operators_audience() {
        let cfg = InjectConfig {
            svid_server: Some("https://op:9444".into()),
            ..InjectConfig::default()
        };
        let p = pod(json!({}));
        let out = apply(&p, &inject(&p, &cfg, &agent(), false).unwrap().unwrap());
        let vols = out.spec.unwrap().volumes.unwrap();
        let token = vols.iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
        let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(projection.audience.as_deref(), Some("mandate"));
        assert!(vols.iter().all(|v| v.csi.is_none()));
    }

    #[test]
    fn native_sidecars_are_restartable_init_containers_with_startup_probes() {
        let p = pod(json!({}));
        let out = apply(
            &p,
            &inject(&p, &InjectConfig::default(), &agent(), true).unwrap().unwrap(),
        );
        let spec = out.spec.as_ref().unwrap();
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 2);
        assert!(
            init.iter()
                .all(|c| c.restart_policy.as_deref() == Some("Always") && c.startup_probe.is_some())
        );
        assert_eq!(spec.containers.len(), 2);
        assert!(init.iter().all(|c| c.lifecycle.is_none()));
    }

    #[test]
    fn a_container_slipped_in_before_ours_is_refused() {
        let cfg = InjectConfig::default();
        for native in [true, false] {
            let p = pod(json!({"spec": {"initContainers": [{"name": "fetch"}], "containers": [{"name": "a"}]}}));
            let injected = apply(&p, &inject(&p, &cfg, &agent(), native).unwrap().unwrap());
            assert!(injection_difference(&injected, &cfg, &agent(), native).is_none());
            // A hostile spec: the same, but with its own container first, so
            // it would run before the proxy (native) or before the hold.
            let mut forged = serde_json::to_value(&injected).unwrap();
            let list = if native { "initContainers" } else { "containers" };
            forged["spec"][list]
                .as_array_mut()
                .unwrap()
                .insert(0, json!({"name": "early", "image": "evil:1"}));
            let forged: Pod = serde_json::from_value(forged).unwrap();
            let why = injection_difference(&forged, &cfg, &agent(), native).expect("refused");
            assert!(why.contains("must be the first two") && why.contains("early"), "{why}");
            assert!(matches!(
                inject(&forged, &cfg, &agent(), native),
                Err(InjectError::Forged(_))
            ));
        }
    }

    #[test]
    fn the_agents_own_init_containers_get_the_proxy_only_behind_native_sidecars() {
        let p = pod(json!({"spec": {
            "initContainers": [{"name": "fetch"}, {"name": "own-proxy", "env": [{"name": "HTTPS_PROXY", "value": "http://elsewhere:3128"}]}],
            "containers": [{"name": "a"}],
        }}));
        let cfg = InjectConfig::default();
        let proxy = format!("http://127.0.0.1:{}", cfg.proxy_port);
        let env_of = |c: &Container, name: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        // Native: ours first, then the agent's own, which go through the proxy.
        let inj = inject(&p, &cfg, &agent(), true).unwrap().unwrap();
        let out = apply(&p, &inj);
        let init = out.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
        let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [ENVOY_CONTAINER, SIDECAR_CONTAINER, "fetch", "own-proxy"]);
        assert_eq!(env_of(&init[2], "HTTP_PROXY"), Some(proxy.clone()));
        assert_eq!(env_of(&init[2], "https_proxy"), Some(proxy.clone()));
        assert_eq!(env_of(&init[2], "NO_PROXY").as_deref(), Some("localhost,127.0.0.1,::1"));
        // A value the init container set itself is kept, and warned about.
        assert_eq!(
            env_of(&init[3], "HTTPS_PROXY").as_deref(),
            Some("http://elsewhere:3128")
        );
        assert!(
            inj.warnings
                .iter()
                .any(|w| w.contains("own-proxy") && w.contains("HTTPS_PROXY"))
        );
        // Ours get no proxy variables.
        assert!(init[..2].iter().all(|c| env_of(c, "HTTP_PROXY").is_none()));
        // Before 1.29 the agent's init containers run before any proxy exists:
        // pointing them at it would only break them.
        let out = apply(&p, &inject(&p, &cfg, &agent(), false).unwrap().unwrap());
        let init = out.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
        assert!(init.iter().all(|c| env_of(c, "HTTP_PROXY").is_none()));
        assert_eq!(
            env_of(&out.spec.as_ref().unwrap().containers[2], "HTTP_PROXY"),
            Some(proxy)
        );
    }

    #[test]
    fn odd_pods_are_refused_with_a_reason() {
        let cfg = InjectConfig::default();
        let none: Pod = serde_json::from_value(json!({"metadata": {"name": "a"}, "spec": {"containers": []}})).unwrap();
        assert_eq!(inject(&none, &cfg, &agent(), false), Err(InjectError::NoContainers));
        let host = pod(json!({"spec": {"hostNetwork": true, "containers": [{"name": "a"}]}}));
        assert_eq!(inject(&host, &cfg, &agent(), false), Err(InjectError::HostNetwork));
        let squat = pod(json!({"spec": {"containers": [{"name": SIDECAR_CONTAINER}]}}));
        assert!(matches!(
            inject(&squat, &cfg, &agent(), false),
            Err(InjectError::ReservedName(_))
        ));
        let vol =
            pod(json!({"spec": {"containers": [{"name": "a"}], "volumes": [{"name": RUN_VOLUME, "emptyDir": {}}]}}));
        assert!(matches!(
            inject(&vol, &cfg, &agent(), false),
            Err(InjectError::ReservedVolume(_))
        ));
        // A huge environment is carried, not choked on.
        let env: Vec<Value> = (0..5000)
            .map(|i| json!({"name": format!("V{i}"), "value": "x"}))
            .collect();
        let big = pod(json!({"spec": {"containers": [{"name": "a", "env": env}]}}));
        let out = apply(&big, &inject(&big, &cfg, &agent(), false).unwrap().unwrap());
        assert_eq!(out.spec.unwrap().containers[2].env.as_ref().unwrap().len(), 5006);
    }

    #[test]
    fn the_bootstrap_fails_closed() {
        let b: Value = serde_json::from_str(&envoy_bootstrap(&InjectConfig::default())).unwrap();
        let text = b.to_string();
        assert!(text.contains(r#""failure_mode_allow":false"#));
        assert!(text.contains(AUTHZ_SOCKET));
        // The egress listener is on loopback only.
        assert_eq!(
            b["static_resources"]["listeners"][0]["address"]["socket_address"]["address"],
            "127.0.0.1"
        );
    }
}
