//! The JSON patch that injects a pod.

use std::collections::BTreeMap;

use json_patch::{AddOperation, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, VolumeMount};
use mandate_api::names::{
    CA_BUNDLE_FILE, CA_DIR, CA_VOLUME, IDENTITY_ANNOTATION, INJECTED_ANNOTATION, POD_CA_FILE,
    POLICY_CONFIGMAP_ANNOTATION, PROXY_WARNING_ANNOTATION,
};
use serde_json::Value;

use super::containers::{containers, egress_init, volumes};
use super::posture::{posture_breach, posture_patch};
use super::verify::{digest, has_our_containers, injection_difference, isolation_breach, reserved_volume};
use super::{AgentRef, InjectConfig};

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

/// The trust variables set on the agent's containers under interception:
/// each names the bundle (system roots plus the pod CA), except Node's,
/// which adds to its own roots and so names the pod CA alone.
const CA_VARS: [(&str, &str); 7] = [
    ("SSL_CERT_FILE", CA_BUNDLE_FILE),
    ("REQUESTS_CA_BUNDLE", CA_BUNDLE_FILE),
    ("CURL_CA_BUNDLE", CA_BUNDLE_FILE),
    ("GIT_SSL_CAINFO", CA_BUNDLE_FILE),
    ("AWS_CA_BUNDLE", CA_BUNDLE_FILE),
    ("PIP_CERT", CA_BUNDLE_FILE),
    ("NODE_EXTRA_CA_CERTS", POD_CA_FILE),
];

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
    #[error("{0}")]
    Isolation(String),
    /// What Pod Security baseline would refuse (hostPID, privileged, added
    /// capabilities, no runAsUser, the proxy's UID...): which container,
    /// which field, what to change.
    #[error("{0}")]
    Posture(String),
    #[error(
        "the pod names its own policy ConfigMap ({POLICY_CONFIGMAP_ANNOTATION}: {0}); the admin chooses which policies bind an agent (the operator's inject config), never the pod; remove the annotation"
    )]
    PodChosenPolicy(String),
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
    if let Some(why) = posture_breach(pod, cfg.run_as_user) {
        return Err(InjectError::Posture(why));
    }
    if let Some(why) = isolation_breach(pod, cfg) {
        return Err(InjectError::Isolation(why));
    }
    if let Some(chosen) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POLICY_CONFIGMAP_ANNOTATION))
    {
        return Err(InjectError::PodChosenPolicy(chosen.clone()));
    }

    let (envoy, sidecar) = containers(pod, cfg, agent, native_sidecars);
    let init = egress_init(cfg);
    let vols = volumes(cfg);
    let to_value = |v: &dyn erased::Ser| v.value().map_err(|e| InjectError::Patch(e.to_string()));
    let mut patch = posture_patch(pod); // allowPrivilegeEscalation: false, at the pod's own indices
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
        if cfg.tls_interception {
            for (var, value) in CA_VARS {
                if c.env.iter().flatten().any(|e| e.name == var) {
                    warnings.push(format!(
                        "container {} sets {var} itself; Mandate kept its value, so it may not trust the pod's interception CA (its HTTPS then fails closed)",
                        c.name
                    ));
                } else {
                    missing.push(EnvVar {
                        name: var.into(),
                        value: Some(value.into()),
                        value_from: None,
                    });
                }
            }
            let mount = VolumeMount {
                name: CA_VOLUME.into(),
                mount_path: CA_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            };
            if c.volume_mounts.is_none() {
                patch.push(add(ptr(&["spec", list, &idx, "volumeMounts"]), to_value(&vec![mount])?));
            } else {
                patch.push(add(ptr(&["spec", list, &idx, "volumeMounts", "-"]), to_value(&mount)?));
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
    // The egress rules' init container goes before everything, so nothing
    // of the agent ever runs unmediated (its own init containers included).
    if let Some(init) = &init {
        if spec.init_containers.is_none() && !native_sidecars {
            patch.push(add(ptr(&["spec", "initContainers"]), to_value(&vec![init])?));
        } else {
            patch.push(add(ptr(&["spec", "initContainers", "0"]), to_value(init)?));
        }
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
    notes.insert(
        INJECTED_ANNOTATION.to_string(),
        digest(init.as_ref(), &envoy, &sidecar, &vols),
    );
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
    use super::super::injected_as_expected;
    use super::super::testing::{agent, apply, pod};
    use super::*;
    use mandate_api::names::{ENVOY_CONTAINER, INIT_CONTAINER, RUN_VOLUME, SIDECAR_CONTAINER};
    use serde_json::json;

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
        // Under interception every agent container trusts the pod CA: the
        // variables point at the bundle (Node's at the CA alone), from a
        // read-only mount; a value the pod set itself is kept, with a warning.
        for (var, want) in CA_VARS {
            assert_eq!(env(2, var).as_deref(), Some(want), "{var}");
        }
        let ca_mount = |c: usize| {
            spec.containers[c]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == CA_VOLUME)
                .cloned()
        };
        assert_eq!(ca_mount(2).and_then(|m| m.read_only), Some(true));
        assert_eq!(ca_mount(3).map(|m| m.mount_path).as_deref(), Some(CA_DIR));
        let own = pod(
            json!({"spec": {"containers": [{"name": "a", "env": [{"name": "SSL_CERT_FILE", "value": "/mine.pem"}]}]}}),
        );
        let own_inj = inject(&own, &cfg, &agent(), false).unwrap().unwrap();
        let own_out = apply(&own, &own_inj);
        let kept = own_out.spec.as_ref().unwrap().containers[2]
            .env
            .clone()
            .unwrap_or_default();
        assert_eq!(kept.iter().filter(|e| e.name == "SSL_CERT_FILE").count(), 1);
        assert!(kept.iter().any(|e| e.value.as_deref() == Some("/mine.pem")));
        assert!(
            own_inj.warnings.iter().any(|w| w.contains("SSL_CERT_FILE")),
            "{:?}",
            own_inj.warnings
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
        assert_eq!(
            names,
            [INIT_CONTAINER, ENVOY_CONTAINER, SIDECAR_CONTAINER, "fetch", "own-proxy"]
        );
        assert_eq!(env_of(&init[3], "HTTP_PROXY"), Some(proxy.clone()));
        assert_eq!(env_of(&init[3], "https_proxy"), Some(proxy.clone()));
        assert_eq!(env_of(&init[3], "NO_PROXY").as_deref(), Some("localhost,127.0.0.1,::1"));
        // A value the init container set itself is kept, and warned about.
        assert_eq!(
            env_of(&init[4], "HTTPS_PROXY").as_deref(),
            Some("http://elsewhere:3128")
        );
        assert!(
            inj.warnings
                .iter()
                .any(|w| w.contains("own-proxy") && w.contains("HTTPS_PROXY"))
        );
        // Ours get no proxy variables.
        assert!(init[..3].iter().all(|c| env_of(c, "HTTP_PROXY").is_none()));
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
        // A hostile agent mounts the volume the webhook is about to add: the
        // authz socket's directory (to swap in its own Check server), or the
        // sidecar's token; from an init container too.
        for (list, volume) in [
            ("containers", RUN_VOLUME),
            ("containers", mandate_api::names::TOKEN_VOLUME),
            ("initContainers", mandate_api::names::BUNDLE_VOLUME),
        ] {
            let mounts = json!([{"name": volume, "mountPath": "/steal"}]);
            let spec = if list == "containers" {
                json!({"containers": [{"name": "a", "volumeMounts": mounts}]})
            } else {
                json!({"containers": [{"name": "a"}], "initContainers": [{"name": "i", "volumeMounts": mounts}]})
            };
            let hostile = pod(json!({ "spec": spec }));
            assert!(
                matches!(
                    inject(&hostile, &cfg, &agent(), false),
                    Err(InjectError::Isolation(ref why)) if why.contains(volume) && why.contains("mounts")
                ),
                "{list} mounting {volume}"
            );
        }
        // Through a shared process namespace the agent reaches the sidecar's
        // files without a mount; and a token of its own for the signer's audience.
        let shared = pod(json!({"spec": {"shareProcessNamespace": true, "containers": [{"name": "a"}]}}));
        assert!(matches!(
            inject(&shared, &cfg, &agent(), false),
            Err(InjectError::Isolation(ref why)) if why.contains("shareProcessNamespace")
        ));
        let own_token = pod(
            json!({"spec": {"containers": [{"name": "a"}], "volumes": [{"name": "t", "projected": {
            "sources": [{"serviceAccountToken": {"audience": "mandate", "path": "token"}}]}}]}}),
        );
        assert!(matches!(
            inject(&own_token, &cfg, &agent(), false),
            Err(InjectError::Isolation(ref why)) if why.contains("audience mandate")
        ));
        let other_audience = pod(
            json!({"spec": {"containers": [{"name": "a"}], "volumes": [{"name": "t", "projected": {
            "sources": [{"serviceAccountToken": {"audience": "vault", "path": "token"}}]}}]}}),
        );
        assert!(inject(&other_audience, &cfg, &agent(), false).is_ok());
        // The pod does not choose its own (allow-all) policies.
        let chooser = pod(json!({
            "metadata": {"name": "a", "annotations": {POLICY_CONFIGMAP_ANNOTATION: "my-allow-all"}},
            "spec": {"containers": [{"name": "a"}]}
        }));
        assert_eq!(
            inject(&chooser, &cfg, &agent(), false),
            Err(InjectError::PodChosenPolicy("my-allow-all".into()))
        );
        // A huge environment is carried, not choked on.
        let env: Vec<Value> = (0..5000)
            .map(|i| json!({"name": format!("V{i}"), "value": "x"}))
            .collect();
        let big = pod(json!({"spec": {"containers": [{"name": "a", "env": env}]}}));
        let out = apply(&big, &inject(&big, &cfg, &agent(), false).unwrap().unwrap());
        // 5000 + 6 proxy variables + 7 trust variables.
        assert_eq!(out.spec.unwrap().containers[2].env.as_ref().unwrap().len(), 5013);
    }
}
