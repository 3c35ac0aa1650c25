//! Whether a pod holds exactly what Mandate injects for it: for re-invoked
//! and already injected pods, and the admission guard.

use k8s_openapi::api::core::v1::{Container, Pod, Volume, VolumeMount};
use kube::ResourceExt;
use mandate_api::names::{
    BUNDLE_VOLUME, CA_VOLUME, ENVOY_CONTAINER, INIT_CONTAINER, INJECTED_ANNOTATION, POLICY_VOLUME, RUN_VOLUME,
    SIDECAR_CONTAINER, SPIFFE_VOLUME, TOKEN_VOLUME,
};
use serde_json::json;

use super::containers::{containers, egress_init, volumes};
use super::posture::posture_breach;
use super::{AgentRef, InjectConfig};

/// Whether `pod` already holds Mandate's containers (by name).
pub(super) fn has_our_containers(pod: &Pod) -> Vec<String> {
    let Some(spec) = &pod.spec else { return vec![] };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| c.name.clone())
        .filter(|n| n == ENVOY_CONTAINER || n == SIDECAR_CONTAINER || n == INIT_CONTAINER)
        .collect()
}

/// A digest of what is injected for this pod, so a re-invocation (or an
/// already injected pod) is recognised and a forged one is not.
pub fn digest(init: Option<&Container>, envoy: &Container, sidecar: &Container, volumes: &[Volume]) -> String {
    use sha2::Digest as _;
    let canonical = match init {
        Some(init) => json!([init, envoy, sidecar, volumes]),
        None => json!([envoy, sidecar, volumes]),
    }
    .to_string();
    let hash = sha2::Sha256::digest(canonical.as_bytes());
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The volumes Mandate injects: only its own containers may mount them.
pub const RESERVED_VOLUMES: [&str; 6] = [
    RUN_VOLUME,
    POLICY_VOLUME,
    TOKEN_VOLUME,
    BUNDLE_VOLUME,
    SPIFFE_VOLUME,
    CA_VOLUME,
];

/// A container of the agent's (or an ephemeral one) that mounts one of
/// Mandate's volumes, as `(container, volume)`: with `mandate-run` it could
/// replace the authz socket with its own Check server, with `mandate-token`
/// take the sidecar's token and get an SVID for a key it holds. The pod
/// CA's bundle (`mandate-ca`, public certificates) is the exception when
/// mounted read-only: that is how the agent trusts interception, and a
/// writable mount would let it swap the bundle the sidecar publishes.
pub fn reserved_mount(pod: &Pod) -> Option<(String, String)> {
    let spec = pod.spec.as_ref()?;
    let theirs = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| c.name != ENVOY_CONTAINER && c.name != SIDECAR_CONTAINER)
        .map(|c| (&c.name, c.volume_mounts.as_deref().unwrap_or_default()));
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c| (&c.name, c.volume_mounts.as_deref().unwrap_or_default()));
    theirs.chain(ephemeral).find_map(|(container, mounts)| {
        mounts
            .iter()
            .find(|m| {
                RESERVED_VOLUMES.contains(&m.name.as_str()) && !(m.name == CA_VOLUME && m.read_only == Some(true))
            })
            .map(|m| (container.clone(), m.name.clone()))
    })
}

/// Why the agent's containers would not be isolated from Mandate's, if
/// they would not: one mounts Mandate's volumes; the pod shares one process
/// namespace (through `/proc/<pid>/root` the agent reaches the sidecar's
/// socket and token without a mount); the pod projects its own
/// ServiceAccount token for the audience the SVID signer accepts; or the pod
/// or one of its containers breaks the posture Mandate holds agents to
/// ([`posture_breach`]: host namespaces, hostPath, privileged, added
/// capabilities, the proxy's UID...).
pub fn isolation_breach(pod: &Pod, cfg: &InjectConfig) -> Option<String> {
    if let Some((container, volume)) = reserved_mount(pod) {
        return Some(format!(
            "container {container} mounts {volume}, a volume only Mandate's containers may mount (it holds the authz socket, the sidecar's token or its trust material); remove the mount"
        ));
    }
    let spec = pod.spec.as_ref()?;
    if spec.share_process_namespace == Some(true) {
        return Some(
            "the pod sets shareProcessNamespace: true, through which the agent could reach the sidecar's socket and token; an agent pod may not share its process namespace".into(),
        );
    }
    let own_token = spec.volumes.iter().flatten().find(|v| {
        v.name != TOKEN_VOLUME
            && v.projected.iter().flat_map(|p| p.sources.iter().flatten()).any(|s| {
                s.service_account_token
                    .as_ref()
                    .is_some_and(|t| t.audience.as_deref() == Some(crate::spiffe::signer::TOKEN_AUDIENCE))
            })
    });
    if let Some(v) = own_token {
        return Some(format!(
            "volume {} projects a ServiceAccount token for audience {}, which only Mandate's sidecar may hold (it would get an SVID for a key the agent holds); remove it",
            v.name,
            crate::spiffe::signer::TOKEN_AUDIENCE
        ));
    }
    posture_breach(pod, cfg.run_as_user)
}

/// Whether `pod` may be given an SVID, by what the signer can check without
/// the injection config of the operator that injected it (that changes on an
/// upgrade; its pods keep renewing): it carries Mandate's marker; its agent
/// is isolated from Mandate's containers ([`isolation_breach`]); and its
/// only token for the signer's audience is the one projected into
/// `mandate-token`, which only `mandate-sidecar` mounts. So the token the
/// signer is shown is the sidecar's. (That the pod was injected at all, not
/// forged, the guard checked when it was created in an enforced namespace;
/// the signer checks the namespace is enforced.)
pub fn svid_eligible(pod: &Pod, cfg: &InjectConfig) -> Result<(), String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    if !pod.annotations().contains_key(INJECTED_ANNOTATION) {
        return Err(format!(
            "pod {name} was not injected by Mandate (no {INJECTED_ANNOTATION}): only an injected sidecar gets an SVID"
        ));
    }
    if let Some(why) = isolation_breach(pod, cfg) {
        return Err(format!("pod {name}: {why}"));
    }
    let spec = pod.spec.as_ref().ok_or_else(|| format!("pod {name} has no spec"))?;
    let projects_ours = spec.volumes.iter().flatten().any(|v| {
        v.name == TOKEN_VOLUME
            && v.projected.iter().flat_map(|p| p.sources.iter().flatten()).any(|s| {
                s.service_account_token
                    .as_ref()
                    .is_some_and(|t| t.audience.as_deref() == Some(crate::spiffe::signer::TOKEN_AUDIENCE))
            })
    });
    let sidecar_mounts = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR_CONTAINER && c.volume_mounts.iter().flatten().any(|m| m.name == TOKEN_VOLUME));
    if !projects_ours || !sidecar_mounts {
        return Err(format!(
            "pod {name} has no {TOKEN_VOLUME} volume projecting the sidecar's token into {SIDECAR_CONTAINER}"
        ));
    }
    Ok(())
}

pub(super) fn reserved_volume(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .find(|n| RESERVED_VOLUMES.contains(&n.as_str()))
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
    if let Some(why) = isolation_breach(pod, cfg) {
        return Some(why);
    }
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
    let init = egress_init(cfg);
    let want = digest(init.as_ref(), &envoy, &sidecar, &volumes(cfg));
    if marker != Some(&want) {
        return Some(format!(
            "its {INJECTED_ANNOTATION} is {marker:?}, not {want} (injected by another version or configuration of Mandate?)"
        ));
    }
    // Mandate's volumes, exactly as injected: the marker is a digest anyone
    // can copy from an injected pod, so a forged pod could carry it with
    // `mandate-policy` pointing at its own ConfigMap, or `mandate-run` on
    // a hostPath.
    if let Some(why) = volume_difference(spec.volumes.as_deref().unwrap_or_default(), &volumes(cfg)) {
        return Some(why);
    }
    // Ours come first in their list: an init container placed before them
    // would run before the proxy exists (native sidecars), and a container
    // before them would start before the postStart hold (the older path).
    let (list, list_name) = if native_sidecars {
        (spec.init_containers.as_deref().unwrap_or_default(), "initContainers")
    } else {
        (spec.containers.as_slice(), "containers")
    };
    if init.is_some() {
        let first = spec.init_containers.iter().flatten().next().map(|c| c.name.as_str());
        if first != Some(INIT_CONTAINER) {
            return Some(format!(
                "{INIT_CONTAINER} must be the first init container, but the first is {first:?} (anything before it runs without the egress rules)"
            ));
        }
        // With native sidecars the egress rules' init container leads the same
        // list; on the older path it leads initContainers.
        let skip = usize::from(init.is_some() && native_sidecars);
        let head: Vec<&str> = list.iter().skip(skip).take(2).map(|c| c.name.as_str()).collect();
        if head != [ENVOY_CONTAINER, SIDECAR_CONTAINER] {
            return Some(format!(
                "{ENVOY_CONTAINER} and {SIDECAR_CONTAINER} must be the first two of {list_name}, but they start with {head:?} (if another admission webhook put its containers first, Mandate refuses the pod: anything before its proxy runs unmediated)"
            ));
        }
    }
    // The apiserver defaults fields we leave unset (terminationMessagePath,
    // probe thresholds...), so compare what we set, field by field.
    for ours in init.iter().chain([&envoy, &sidecar]) {
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

/// How the pod's volumes of Mandate's names differ from `ours`, if they do:
/// each of ours present and equal (up to the modes the apiserver defaults),
/// and no other volume by a reserved name.
fn volume_difference(theirs: &[Volume], ours: &[Volume]) -> Option<String> {
    const DEFAULT_MODE: i32 = 0o644;
    let defaulted = |v: &Volume| {
        let mut v = v.clone();
        if let Some(c) = v.config_map.as_mut()
            && c.default_mode == Some(DEFAULT_MODE)
        {
            c.default_mode = None;
        }
        if let Some(p) = v.projected.as_mut()
            && p.default_mode == Some(DEFAULT_MODE)
        {
            p.default_mode = None;
        }
        v
    };
    for want in ours {
        match theirs.iter().find(|v| v.name == want.name) {
            None => return Some(format!("volume {} is missing", want.name)),
            Some(have) if defaulted(have) != *want => {
                return Some(format!(
                    "volume {} is not the one Mandate injects (its source differs)",
                    want.name
                ));
            }
            Some(_) => {}
        }
    }
    theirs
        .iter()
        .find(|v| RESERVED_VOLUMES.contains(&v.name.as_str()) && !ours.iter().any(|o| o.name == v.name))
        .map(|v| format!("volume {} uses a name reserved for Mandate's volumes", v.name))
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

#[cfg(test)]
mod tests {
    use super::super::testing::{agent, apply, pod};
    use super::super::{InjectError, inject};
    use super::*;

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
            forged["spec"][list].as_array_mut().unwrap().insert(
                0,
                json!({"name": "early", "image": "evil:1", "securityContext": {"allowPrivilegeEscalation": false}}),
            );
            let forged: Pod = serde_json::from_value(forged).unwrap();
            let why = injection_difference(&forged, &cfg, &agent(), native).expect("refused");
            assert!(why.contains("must be the first") && why.contains("early"), "{why}");
            assert!(matches!(
                inject(&forged, &cfg, &agent(), native),
                Err(InjectError::Forged(_))
            ));
        }
    }

    #[test]
    fn a_forged_pod_with_the_marker_but_other_volumes_is_refused() {
        let cfg = InjectConfig {
            svid_server: Some("https://mandate-operator.mandate-system.svc:8443".into()),
            ..InjectConfig::default()
        };
        let p = pod(json!({"spec": {"containers": [{"name": "a"}]}}));
        let injected = apply(&p, &inject(&p, &cfg, &agent(), true).unwrap().unwrap());
        assert!(injection_difference(&injected, &cfg, &agent(), true).is_none());
        // The apiserver's defaulting of volume modes is not a difference.
        let mut defaulted = serde_json::to_value(&injected).unwrap();
        for v in defaulted["spec"]["volumes"].as_array_mut().unwrap() {
            for kind in ["configMap", "projected"] {
                if v.get(kind).is_some() {
                    v[kind]["defaultMode"] = json!(420);
                }
            }
        }
        let defaulted: Pod = serde_json::from_value(defaulted).unwrap();
        assert_eq!(injection_difference(&defaulted, &cfg, &agent(), true), None);
        // Same marker, same containers, but the policy volume is the
        // attacker's ConfigMap, the socket's directory a hostPath, the
        // token for another audience, or a volume gone or added.
        type Forge<'a> = &'a dyn Fn(&mut serde_json::Value);
        let forgeries: [(&str, Forge); 5] = [
            (POLICY_VOLUME, &|v| v["configMap"]["name"] = json!("allow-all")),
            (RUN_VOLUME, &|v| {
                v.as_object_mut().unwrap().remove("emptyDir");
                v["hostPath"] = json!({"path": "/tmp/x"});
            }),
            (TOKEN_VOLUME, &|v| {
                v["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"] = json!(86400)
            }),
            (BUNDLE_VOLUME, &|v| v["name"] = json!("renamed")),
            (SPIFFE_VOLUME, &|_| {}),
        ];
        for (volume, forge) in forgeries {
            let mut forged = serde_json::to_value(&injected).unwrap();
            let vols = forged["spec"]["volumes"].as_array_mut().unwrap();
            if volume == SPIFFE_VOLUME {
                vols.push(json!({"name": SPIFFE_VOLUME, "emptyDir": {}}));
            } else {
                forge(vols.iter_mut().find(|v| v["name"] == volume).unwrap());
            }
            let forged: Pod = serde_json::from_value(forged).unwrap();
            let why = injection_difference(&forged, &cfg, &agent(), true).expect("refused");
            assert!(why.contains("volume "), "{volume}: {why}");
        }
    }

    #[test]
    fn an_injected_pod_whose_agent_mounts_our_volumes_is_refused_by_the_guard() {
        let cfg = InjectConfig::default();
        let p = pod(json!({"spec": {"containers": [{"name": "a"}]}}));
        let injected = apply(&p, &inject(&p, &cfg, &agent(), true).unwrap().unwrap());
        assert!(injection_difference(&injected, &cfg, &agent(), true).is_none());
        for volume in RESERVED_VOLUMES {
            let mut hostile = serde_json::to_value(&injected).unwrap();
            let agent_container = hostile["spec"]["containers"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|c| c["name"] == "a")
                .unwrap();
            agent_container["volumeMounts"] = json!([{"name": volume, "mountPath": "/var/run/mandate"}]);
            let hostile: Pod = serde_json::from_value(hostile).unwrap();
            let why = injection_difference(&hostile, &cfg, &agent(), true).expect("refused");
            assert!(why.contains("container a mounts") && why.contains(volume), "{why}");
        }
        // An ephemeral container (kubectl debug) mounting the socket's directory.
        let mut debug = serde_json::to_value(&injected).unwrap();
        debug["spec"]["ephemeralContainers"] = json!([{"name": "debugger", "image": "busybox", "volumeMounts": [{"name": RUN_VOLUME, "mountPath": "/x"}]}]);
        let debug: Pod = serde_json::from_value(debug).unwrap();
        assert_eq!(
            reserved_mount(&debug),
            Some(("debugger".to_string(), RUN_VOLUME.to_string()))
        );
        // The pod CA's bundle: read-only (as injected) is how the agent
        // trusts interception; writable (to swap the bundle) is refused above.
        let mut reader = serde_json::to_value(&injected).unwrap();
        reader["spec"]["ephemeralContainers"] = json!([{"name": "reader", "image": "busybox", "volumeMounts": [{"name": CA_VOLUME, "mountPath": "/ca", "readOnly": true}]}]);
        let reader: Pod = serde_json::from_value(reader).unwrap();
        assert_eq!(reserved_mount(&reader), None);
    }
}
