//! The two containers Mandate injects, the sidecar's environment, and
//! their volumes.

use std::net::{Ipv4Addr, SocketAddr};

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource,
    SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mandate_api::env::{BuiltinIdentity, EnvValue, PodField, SidecarEnv, SidecarIdentity, SpireIdentity};
use mandate_api::names::{
    AUTHZ_SOCKET, BUNDLE_VOLUME, CA_DIR, CA_VOLUME, ENVOY_CONTAINER, INIT_CONTAINER, POLICY_DIR, POLICY_VOLUME,
    RUN_VOLUME, SDS_SOCKET, SIDECAR_CONTAINER, SPIFFE_VOLUME, SVID_TOKEN_FILE, TOKEN_VOLUME, TRUST_BUNDLE_FILE,
};
use mandate_identity::workload::IdentitySource;

use super::envoy::envoy_bootstrap;
use super::{AgentRef, InjectConfig};

/// What the sidecar of this pod is told: its environment, as the injector
/// writes it (exactly these pairs, in this order).
pub fn sidecar_env(cfg: &InjectConfig, agent: &AgentRef) -> SidecarEnv {
    let identity = if cfg.identity_source == IdentitySource::Spire {
        // The SVID and bundle come from the SPIRE agent through the CSI
        // driver's socket; the AgentIdentity name is checked against the
        // SVID (the sidecar takes only an SVID with the agent's SPIFFE ID).
        SidecarIdentity::Spire(SpireIdentity {
            spiffe_endpoint_socket: format!(
                "unix://{}/{}",
                cfg.spiffe_socket_dir.trim_end_matches('/'),
                cfg.spiffe_socket_name
            ),
            trust_domain: cfg.trust_domain.clone(),
            operator_spiffe_id: cfg.operator_spiffe_id.clone(),
            policy_server: cfg.policy_server.clone(),
        })
    } else if let Some(server) = &cfg.svid_server {
        SidecarIdentity::Builtin(BuiltinIdentity {
            svid_server: server.clone(),
            trust_domain: cfg.trust_domain.clone(),
            svid_token_file: SVID_TOKEN_FILE.into(),
            trust_bundle_file: TRUST_BUNDLE_FILE.into(),
            policy_server: cfg.policy_server.clone(),
        })
    } else {
        SidecarIdentity::None
    };
    SidecarEnv {
        policy: POLICY_DIR.into(),
        listen_unix: AUTHZ_SOCKET.into(),
        no_tcp: true,
        admin_listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.sidecar_admin_port)),
        eval_timeout_ms: cfg.eval_timeout_ms,
        max_body_bytes: u64::from(cfg.max_request_bytes),
        agent_namespace: EnvValue::Field(PodField::Namespace),
        agent_pod: EnvValue::Field(PodField::Name),
        agent_service_account: EnvValue::Field(PodField::ServiceAccountName),
        agent_identity: agent.identity.clone(),
        identity,
        agent_spiffe_id: agent.spiffe_id.clone(),
        // Transparent egress sends the agent's DNS (port 53) to the
        // sidecar's resolver, on both loopbacks.
        dns_listen: cfg
            .transparent_egress
            .then(|| format!("127.0.0.1:{port},[::1]:{port}", port = cfg.dns_port)),
        dns_cluster_domain: cfg.transparent_egress.then(|| cfg.cluster_domain.clone()),
        interception: cfg
            .tls_interception
            .then(|| (SDS_SOCKET.to_string(), CA_DIR.to_string())),
    }
}

/// The container environment of `env`.
fn env_vars(env: &SidecarEnv) -> Vec<EnvVar> {
    env.pairs()
        .into_iter()
        .map(|(name, value)| match value {
            EnvValue::Literal(value) => EnvVar {
                name: name.into(),
                value: Some(value),
                value_from: None,
            },
            EnvValue::Field(field) => EnvVar {
                name: name.into(),
                value: None,
                value_from: Some(EnvVarSource {
                    // As the apiserver defaults it, so the injected pod compares equal.
                    field_ref: Some(ObjectFieldSelector {
                        field_path: field.path().into(),
                        api_version: Some("v1".into()),
                    }),
                    ..EnvVarSource::default()
                }),
            },
        })
        .collect()
}

/// The two containers for this pod: Envoy and the sidecar (its environment
/// is exactly [`sidecar_env`]'s pairs).
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
    let mut sidecar_mounts = vec![
        run_mount.clone(),
        VolumeMount {
            name: POLICY_VOLUME.into(),
            mount_path: POLICY_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    if cfg.tls_interception {
        // The sidecar alone writes the pod CA's bundle.
        sidecar_mounts.push(VolumeMount {
            name: CA_VOLUME.into(),
            mount_path: CA_DIR.into(),
            ..VolumeMount::default()
        });
    }
    if cfg.identity_source == IdentitySource::Spire {
        sidecar_mounts.push(VolumeMount {
            name: SPIFFE_VOLUME.into(),
            mount_path: cfg.spiffe_socket_dir.clone(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    } else if cfg.svid_server.is_some() {
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
    let mut sidecar = Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(cfg.sidecar_image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec![cfg.sidecar_command.clone()]),
        env: Some(env_vars(&sidecar_env(cfg, agent))),
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

/// The init container that installs the pod's egress rules (transparent
/// egress): first of all, as root with NET_ADMIN alone (nftables needs it;
/// Kubernetes gives a non-root container no capabilities), from the
/// sidecar's image. `None` when transparent egress is off.
pub fn egress_init(cfg: &InjectConfig) -> Option<Container> {
    if !cfg.transparent_egress {
        return None;
    }
    Some(Container {
        name: INIT_CONTAINER.into(),
        image: Some(cfg.sidecar_image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec![cfg.egress_init_command.clone()]),
        args: Some(vec![
            format!("--proxy-uid={}", cfg.run_as_user),
            format!("--proxy-port={}", cfg.proxy_port),
            format!("--transparent-port={}", cfg.transparent_port),
            format!("--dns-port={}", cfg.dns_port),
        ]),
        resources: Some(cfg.sidecar_resources.clone()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            run_as_group: Some(0),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    })
}

pub(super) fn volumes(cfg: &InjectConfig) -> Vec<Volume> {
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
                name: cfg.policy_configmap.clone(),
                // A missing ConfigMap leaves the sidecar without policy: not
                // Ready, and every request denied.
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    if cfg.tls_interception {
        vols.push(Volume {
            name: CA_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
            }),
            ..Volume::default()
        });
    }
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

#[cfg(test)]
mod tests {
    use super::super::testing::{agent, apply, pod};
    use super::super::{InjectConfig, InjectError, inject, injected_as_expected};
    use super::*;
    use json_patch::PatchOperation;
    use mandate_api::env::SIDECAR_ENV_NAMES;
    use serde_json::{Value, json};

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
        // The agent's own containers do not get the socket: only the pod
        // CA's bundle, read-only.
        let agent_c = spec.containers.iter().find(|c| c.name == "agent").unwrap();
        let theirs: Vec<_> = agent_c.volume_mounts.iter().flatten().collect();
        assert_eq!(
            theirs,
            [&VolumeMount {
                name: mandate_api::names::CA_VOLUME.into(),
                mount_path: mandate_api::names::CA_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]
        );

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
        assert_eq!(init.len(), 3);
        // The egress rules first: a one-shot init container, root with NET_ADMIN alone.
        assert_eq!(init[0].name, INIT_CONTAINER);
        assert_eq!(init[0].restart_policy, None);
        let sc = init[0].security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_user, Some(0));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        let init = &init[1..];
        assert!(
            init.iter()
                .all(|c| c.restart_policy.as_deref() == Some("Always") && c.startup_probe.is_some())
        );
        assert_eq!(spec.containers.len(), 2);
        assert!(init.iter().all(|c| c.lifecycle.is_none()));
    }

    #[test]
    fn transparent_egress_gives_the_sidecar_a_dns_resolver_on_both_loopbacks() {
        let cfg = InjectConfig {
            transparent_egress: true,
            dns_port: 15053,
            cluster_domain: "corp.internal".into(),
            ..InjectConfig::default()
        };
        let env = sidecar_env(&cfg, &agent());
        assert_eq!(env.dns_listen.as_deref(), Some("127.0.0.1:15053,[::1]:15053"));
        assert_eq!(env.dns_cluster_domain.as_deref(), Some("corp.internal"));
        let off = InjectConfig {
            transparent_egress: false,
            ..cfg
        };
        let env = sidecar_env(&off, &agent());
        assert_eq!((env.dns_listen, env.dns_cluster_domain), (None, None));
    }

    #[test]
    fn the_sidecar_gets_exactly_its_sidecar_env() {
        let spire = InjectConfig {
            identity_source: IdentitySource::Spire,
            policy_server: Some("https://op:9445".into()),
            ..InjectConfig::default()
        };
        let builtin = InjectConfig {
            svid_server: Some("https://op:9444".into()),
            ..InjectConfig::default()
        };
        for cfg in [InjectConfig::default(), spire, builtin] {
            let (_, sidecar) = containers(&pod(json!({})), &cfg, &agent(), false);
            let env = sidecar.env.unwrap();
            let pairs = sidecar_env(&cfg, &agent()).pairs();
            assert_eq!(env, env_vars(&sidecar_env(&cfg, &agent())));
            let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
            let want: Vec<&str> = pairs.iter().map(|(n, _)| *n).collect();
            assert_eq!(names, want);
            assert!(names.iter().all(|n| SIDECAR_ENV_NAMES.contains(n)), "{names:?}");
        }
        // The pod's own fields, through the downward API.
        let (_, sidecar) = containers(&pod(json!({})), &InjectConfig::default(), &agent(), false);
        let ns = sidecar
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "MANDATE_AGENT_NAMESPACE")
            .unwrap();
        assert_eq!(ns.value, None);
        assert_eq!(
            ns.value_from.as_ref().and_then(|v| v.field_ref.as_ref()),
            Some(&ObjectFieldSelector {
                field_path: "metadata.namespace".into(),
                api_version: Some("v1".into()),
            })
        );
    }
}
