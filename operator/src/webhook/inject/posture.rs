//! The security posture of an agent pod's own containers: what Pod Security
//! `baseline` (and the parts of `restricted` that matter here) would refuse,
//! enforced by Mandate itself.
//!
//! Transparent egress needs an init container with NET_ADMIN, so an enforced
//! namespace must allow Pod Security `privileged`; the apiserver then refuses
//! nothing, and an agent that escapes its container escapes mediation. With
//! NET_ADMIN it could flush the pod's egress rules, with SETUID become the
//! proxy's UID (the one UID the rules exempt), with hostPID reach
//! `/proc/<envoy>/root/var/run/mandate/` (the authz socket, Envoy's admin
//! socket, the sidecar's token), with hostNetwork leave the pod's network
//! namespace. So every container of the agent's (containers and
//! initContainers; ephemeral ones are refused in enforced namespaces) is held
//! to these rules, at injection and by the guard, and the injector sets
//! `allowPrivilegeEscalation: false` where the pod left it unset (a setuid
//! binary or file capability in the image could otherwise regain SETUID).

use json_patch::{AddOperation, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, SELinuxOptions};
use mandate_api::names::{ENVOY_CONTAINER, INIT_CONTAINER, INJECTED_ANNOTATION, SIDECAR_CONTAINER};
use serde_json::{Value, json};

/// Mandate's own containers: held to what Mandate injects, not to these rules.
pub const MANDATE_CONTAINERS: [&str; 3] = [ENVOY_CONTAINER, SIDECAR_CONTAINER, INIT_CONTAINER];

/// The one capability an agent container may add (binding a port below 1024).
const ALLOWED_CAPABILITY: &str = "NET_BIND_SERVICE";

/// The sysctls Pod Security `baseline` allows (namespaced, and harmless).
const SAFE_SYSCTLS: [&str; 12] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// The SELinux types Pod Security `baseline` allows.
const SELINUX_TYPES: [&str; 4] = [
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// The legacy per-container AppArmor annotation.
const APPARMOR_ANNOTATION_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";

/// A capability's name as the kernel knows it: upper case, without `CAP_`.
fn capability(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").map(str::to_string).unwrap_or(upper)
}

/// The agent's own containers, as `(list, index, container)`.
fn agent_containers(spec: &PodSpec) -> impl Iterator<Item = (&'static str, usize, &Container)> {
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| ("initContainers", i, c));
    init.chain(spec.containers.iter().enumerate().map(|(i, c)| ("containers", i, c)))
        .filter(|(_, _, c)| !MANDATE_CONTAINERS.contains(&c.name.as_str()))
}

fn selinux_breach(o: &SELinuxOptions, whose: &str) -> Option<String> {
    if let Some(t) = o
        .type_
        .as_deref()
        .filter(|t| !t.is_empty() && !SELINUX_TYPES.contains(t))
    {
        return Some(format!(
            "{whose} sets seLinuxOptions.type {t}; an agent may only use {}; remove it",
            SELINUX_TYPES.join(", ")
        ));
    }
    if o.user.as_deref().is_some_and(|u| !u.is_empty()) || o.role.as_deref().is_some_and(|r| !r.is_empty()) {
        return Some(format!(
            "{whose} sets seLinuxOptions.user or .role, which an agent may not; remove them"
        ));
    }
    None
}

/// What in the pod's own spec (not a container's) breaks the agent's
/// isolation from Mandate's proxy, if anything.
fn pod_breach(pod: &Pod, spec: &PodSpec) -> Option<String> {
    let host = [
        (
            spec.host_network,
            "hostNetwork",
            "the pod would be on the node's network, outside the pod's network namespace where Mandate's egress rules and proxy are",
        ),
        (
            spec.host_pid,
            "hostPID",
            "through the node's process namespace the agent reaches /proc/<pid>/root of Mandate's proxy and sidecar (the authz socket, Envoy's admin socket, the sidecar's token)",
        ),
        (
            spec.host_ipc,
            "hostIPC",
            "the agent would share the node's IPC namespace with every process on it",
        ),
    ];
    if let Some((_, field, why)) = host.iter().find(|(on, _, _)| *on == Some(true)) {
        return Some(format!(
            "the pod sets spec.{field}: true; {why}; an agent pod may not, remove it"
        ));
    }
    if let Some(v) = spec.volumes.iter().flatten().find(|v| v.host_path.is_some()) {
        return Some(format!(
            "volume {} is a hostPath volume; through the node's filesystem the agent could reach Mandate's sockets and tokens, or the node itself; use an emptyDir, a ConfigMap, a Secret or a PersistentVolumeClaim instead",
            v.name
        ));
    }
    if let Some(sc) = &spec.security_context {
        let whose = "the pod's securityContext";
        if sc.seccomp_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
            return Some(format!(
                "{whose} sets seccompProfile.type: Unconfined; an agent runs under RuntimeDefault or a Localhost profile; remove it"
            ));
        }
        if sc.app_armor_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
            return Some(format!(
                "{whose} sets appArmorProfile.type: Unconfined; an agent runs under RuntimeDefault or a Localhost profile; remove it"
            ));
        }
        if sc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
            return Some(format!(
                "{whose} sets windowsOptions.hostProcess: true, which runs the pod on the node's host; remove it"
            ));
        }
        if let Some(why) = sc.se_linux_options.as_ref().and_then(|o| selinux_breach(o, whose)) {
            return Some(why);
        }
        if let Some(s) = sc
            .sysctls
            .iter()
            .flatten()
            .find(|s| !SAFE_SYSCTLS.contains(&s.name.as_str()))
        {
            return Some(format!(
                "{whose} sets sysctl {}, which Pod Security baseline does not allow (it could change the network namespace Mandate's egress rules are in); the allowed ones are {}",
                s.name,
                SAFE_SYSCTLS.join(", ")
            ));
        }
    }
    pod.metadata
        .annotations
        .iter()
        .flatten()
        .find(|(k, v)| k.starts_with(APPARMOR_ANNOTATION_PREFIX) && v.as_str() == "unconfined")
        .map(|(k, _)| {
            format!("the pod's annotation {k} is unconfined; an agent container runs under AppArmor; remove it")
        })
}

/// What in one of the agent's containers breaks its isolation, if anything.
/// `injected`: the pod carries Mandate's marker, so the injector has already
/// set `allowPrivilegeEscalation: false` and it must be there.
fn container_breach(spec: &PodSpec, list: &str, c: &Container, proxy_uid: i64, injected: bool) -> Option<String> {
    let whose = format!("container {} ({list})", c.name);
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        return Some(format!(
            "{whose} sets securityContext.privileged: true; a privileged agent could rewrite the pod's egress rules or read Mandate's proxy; remove it"
        ));
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    if let Some(cap) = caps.add.iter().flatten().find(|a| capability(a) != ALLOWED_CAPABILITY) {
        return Some(format!(
            "{whose} adds capability {cap} (securityContext.capabilities.add); an agent container may add only {ALLOWED_CAPABILITY} (with NET_ADMIN it could flush the pod's egress rules, with SETUID become the proxy's UID); remove it"
        ));
    }
    match sc.allow_privilege_escalation {
        Some(true) => {
            return Some(format!(
                "{whose} sets securityContext.allowPrivilegeEscalation: true; an agent may not gain privileges (a setuid binary could become the proxy's UID); remove it and Mandate sets it to false"
            ));
        }
        None if injected => {
            return Some(format!(
                "{whose} does not set securityContext.allowPrivilegeEscalation: false, which Mandate sets on every agent container it injects"
            ));
        }
        _ => {}
    }
    if let Some(pm) = sc.proc_mount.as_deref().filter(|p| *p != "Default") {
        return Some(format!(
            "{whose} sets securityContext.procMount: {pm}; an agent container uses the Default /proc mask; remove it"
        ));
    }
    if sc.seccomp_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
        return Some(format!(
            "{whose} sets securityContext.seccompProfile.type: Unconfined; an agent runs under RuntimeDefault or a Localhost profile; remove it"
        ));
    }
    if sc.app_armor_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
        return Some(format!(
            "{whose} sets securityContext.appArmorProfile.type: Unconfined; an agent runs under RuntimeDefault or a Localhost profile; remove it"
        ));
    }
    if sc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
        return Some(format!(
            "{whose} sets securityContext.windowsOptions.hostProcess: true, which runs it on the node's host; remove it"
        ));
    }
    if let Some(why) = sc.se_linux_options.as_ref().and_then(|o| selinux_breach(o, &whose)) {
        return Some(why);
    }
    if let Some(port) = c.ports.iter().flatten().find(|p| p.host_port.is_some_and(|h| h != 0)) {
        return Some(format!(
            "{whose} sets hostPort {} on port {}; an agent container is reached through its pod's IP or a Service, not the node's ports; remove it",
            port.host_port.unwrap_or_default(),
            port.container_port
        ));
    }
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let Some(uid) = sc.run_as_user.or(pod_uid) else {
        return Some(format!(
            "{whose} has no runAsUser (neither its securityContext nor the pod's sets one); Mandate cannot see an image's USER at admission, and the proxy's UID {proxy_uid} is exempt from the egress rules; set securityContext.runAsUser (e.g. 1000, with runAsNonRoot: true) on the pod or the container"
        ));
    };
    if uid == proxy_uid {
        return Some(format!(
            "{whose} runs as UID {uid}, the UID of Mandate's proxy, whose traffic the pod's egress rules exempt; run the agent as another UID"
        ));
    }
    if uid == 0 {
        let dropped = caps
            .drop
            .iter()
            .flatten()
            .map(|d| capability(d))
            .any(|d| d == "SETUID" || d == "ALL");
        if !dropped {
            return Some(format!(
                "{whose} runs as root (runAsUser 0) without dropping SETUID, with which it could become the proxy's UID {proxy_uid}, exempt from the egress rules; run it as a non-root UID, or add ALL (or SETUID) to securityContext.capabilities.drop"
            ));
        }
    }
    None
}

/// Why the pod's own containers (or the pod) may not run next to Mandate's
/// proxy, if they may not; the first problem found, naming the container and
/// the field, and what to change. `proxy_uid` is the proxy's UID
/// (`InjectConfig::run_as_user`).
pub fn posture_breach(pod: &Pod, proxy_uid: i64) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(why) = pod_breach(pod, spec) {
        return Some(why);
    }
    let injected = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    agent_containers(spec).find_map(|(list, _, c)| container_breach(spec, list, c, proxy_uid, injected))
}

/// The patch operations that set `allowPrivilegeEscalation: false` on each of
/// the agent's containers that leaves it unset (creating its securityContext
/// if it has none). Paths are the pod's own indices: the operations go before
/// anything that inserts containers.
pub fn posture_patch(pod: &Pod) -> Vec<PatchOperation> {
    let Some(spec) = &pod.spec else { return vec![] };
    agent_containers(spec)
        .filter_map(|(list, i, c)| {
            let idx = i.to_string();
            let (path, value) = match &c.security_context {
                None => (
                    vec!["spec", list, &idx, "securityContext"],
                    json!({"allowPrivilegeEscalation": false}),
                ),
                Some(sc) if sc.allow_privilege_escalation.is_none() => (
                    vec!["spec", list, &idx, "securityContext", "allowPrivilegeEscalation"],
                    Value::Bool(false),
                ),
                Some(_) => return None,
            };
            Some(PatchOperation::Add(AddOperation {
                path: PointerBuf::from_tokens(path),
                value,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testing::{agent, apply, pod};
    use super::super::{InjectConfig, InjectError, inject, injection_difference};
    use super::*;

    const PROXY: i64 = 15999;

    /// A pod of one container `a` whose securityContext is `sc`, with the
    /// pod's securityContext `psc` and `spec`'s other fields.
    fn hostile(psc: Value, sc: Value, spec: Value) -> Pod {
        let mut s =
            json!({"securityContext": psc, "containers": [{"name": "a", "image": "a:1", "securityContext": sc}]});
        if let (Some(s), Value::Object(extra)) = (s.as_object_mut(), spec) {
            s.extend(extra);
        }
        pod(json!({ "spec": s }))
    }

    fn ok_psc() -> Value {
        json!({"runAsUser": 1000, "runAsNonRoot": true})
    }

    #[test]
    fn every_rule_is_refused_with_its_reason() {
        let cases: Vec<(&str, Pod, &[&str])> = vec![
            (
                "hostNetwork",
                hostile(ok_psc(), json!({}), json!({"hostNetwork": true})),
                &["spec.hostNetwork"],
            ),
            (
                "hostPID",
                hostile(ok_psc(), json!({}), json!({"hostPID": true})),
                &["spec.hostPID", "/proc"],
            ),
            (
                "hostIPC",
                hostile(ok_psc(), json!({}), json!({"hostIPC": true})),
                &["spec.hostIPC"],
            ),
            (
                "hostPath",
                hostile(
                    ok_psc(),
                    json!({}),
                    json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
                ),
                &["volume root", "hostPath"],
            ),
            (
                "privileged",
                hostile(ok_psc(), json!({"privileged": true}), json!({})),
                &["container a (containers)", "privileged: true"],
            ),
            (
                "NET_ADMIN",
                hostile(ok_psc(), json!({"capabilities": {"add": ["NET_ADMIN"]}}), json!({})),
                &["container a", "adds capability NET_ADMIN"],
            ),
            (
                "cap_setuid, lower case with the prefix",
                hostile(ok_psc(), json!({"capabilities": {"add": ["cap_setuid"]}}), json!({})),
                &["adds capability cap_setuid"],
            ),
            (
                "ALL",
                hostile(
                    ok_psc(),
                    json!({"capabilities": {"add": ["NET_BIND_SERVICE", "ALL"]}}),
                    json!({}),
                ),
                &["adds capability ALL"],
            ),
            (
                "allowPrivilegeEscalation",
                hostile(ok_psc(), json!({"allowPrivilegeEscalation": true}), json!({})),
                &["allowPrivilegeEscalation: true"],
            ),
            (
                "procMount",
                hostile(ok_psc(), json!({"procMount": "Unmasked"}), json!({})),
                &["procMount: Unmasked"],
            ),
            (
                "container seccomp",
                hostile(ok_psc(), json!({"seccompProfile": {"type": "Unconfined"}}), json!({})),
                &["container a", "seccompProfile.type: Unconfined"],
            ),
            (
                "pod seccomp",
                hostile(
                    json!({"runAsUser": 1000, "seccompProfile": {"type": "Unconfined"}}),
                    json!({}),
                    json!({}),
                ),
                &["the pod's securityContext", "seccompProfile.type: Unconfined"],
            ),
            (
                "container AppArmor",
                hostile(ok_psc(), json!({"appArmorProfile": {"type": "Unconfined"}}), json!({})),
                &["container a", "appArmorProfile.type: Unconfined"],
            ),
            (
                "pod AppArmor",
                hostile(
                    json!({"runAsUser": 1000, "appArmorProfile": {"type": "Unconfined"}}),
                    json!({}),
                    json!({}),
                ),
                &["the pod's securityContext", "appArmorProfile"],
            ),
            (
                "container hostProcess",
                hostile(ok_psc(), json!({"windowsOptions": {"hostProcess": true}}), json!({})),
                &["container a", "hostProcess: true"],
            ),
            (
                "pod hostProcess",
                hostile(
                    json!({"runAsUser": 1000, "windowsOptions": {"hostProcess": true}}),
                    json!({}),
                    json!({}),
                ),
                &["the pod's securityContext", "hostProcess: true"],
            ),
            (
                "SELinux type",
                hostile(ok_psc(), json!({"seLinuxOptions": {"type": "spc_t"}}), json!({})),
                &["seLinuxOptions.type spc_t"],
            ),
            (
                "unsafe sysctl",
                hostile(
                    json!({"runAsUser": 1000, "sysctls": [{"name": "net.ipv4.conf.all.route_localnet", "value": "1"}]}),
                    json!({}),
                    json!({}),
                ),
                &["sysctl net.ipv4.conf.all.route_localnet"],
            ),
            (
                "hostPort",
                hostile(
                    ok_psc(),
                    json!({}),
                    json!({"containers": [{"name": "a", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
                ),
                &["container a", "hostPort 8080"],
            ),
            (
                "no runAsUser",
                hostile(json!({"runAsNonRoot": true}), json!({}), json!({})),
                &[
                    "container a (containers) has no runAsUser",
                    "set securityContext.runAsUser",
                ],
            ),
            (
                "the proxy's UID (container)",
                hostile(ok_psc(), json!({"runAsUser": PROXY}), json!({})),
                &["runs as UID 15999", "the UID of Mandate's proxy"],
            ),
            (
                "the proxy's UID (pod)",
                hostile(json!({"runAsUser": PROXY}), json!({}), json!({})),
                &["runs as UID 15999"],
            ),
            (
                "root without dropping SETUID",
                hostile(
                    json!({"runAsUser": 0}),
                    json!({"capabilities": {"drop": ["NET_RAW"]}}),
                    json!({}),
                ),
                &["runs as root", "SETUID"],
            ),
            (
                "an init container",
                hostile(
                    ok_psc(),
                    json!({}),
                    json!({"initContainers": [{"name": "setup", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}),
                ),
                &["container setup (initContainers)", "SYS_ADMIN"],
            ),
            (
                "an init container without a UID",
                hostile(
                    json!({}),
                    json!({"runAsUser": 1000}),
                    json!({"initContainers": [{"name": "setup"}]}),
                ),
                &["container setup (initContainers) has no runAsUser"],
            ),
            (
                "legacy AppArmor annotation",
                {
                    let mut p = hostile(ok_psc(), json!({}), json!({}));
                    p.metadata.annotations = Some(
                        [(format!("{APPARMOR_ANNOTATION_PREFIX}a"), "unconfined".to_string())]
                            .into_iter()
                            .collect(),
                    );
                    p
                },
                &["apparmor", "unconfined"],
            ),
        ];
        let cfg = InjectConfig::default();
        assert_eq!(cfg.run_as_user, PROXY);
        for (what, p, needles) in cases {
            let why = posture_breach(&p, PROXY).unwrap_or_else(|| panic!("{what}: accepted"));
            for n in needles {
                assert!(why.contains(n), "{what}: {why:?} does not say {n:?}");
            }
            // And injection refuses it, with that reason.
            match inject(&p, &cfg, &agent(), true) {
                Err(InjectError::Posture(r)) => assert_eq!(r, why, "{what}"),
                Err(InjectError::HostNetwork) if what == "hostNetwork" => {}
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn ordinary_pods_are_accepted_and_get_no_privilege_escalation() {
        let ordinary = [
            hostile(ok_psc(), json!({}), json!({})),
            // The UID on the container; NET_BIND_SERVICE in any spelling; Default procMount;
            // RuntimeDefault seccomp; a safe sysctl; hostPort 0.
            hostile(
                json!({"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"}]}),
                json!({"runAsUser": 1000, "capabilities": {"add": ["cap_net_bind_service"], "drop": ["ALL"]},
                       "procMount": "Default", "seccompProfile": {"type": "RuntimeDefault"}, "allowPrivilegeEscalation": false}),
                json!({}),
            ),
            // Root with SETUID dropped (as CAP_SETUID, lower case).
            hostile(
                json!({"runAsUser": 0}),
                json!({"capabilities": {"drop": ["cap_setuid"]}}),
                json!({}),
            ),
            hostile(
                json!({"runAsUser": 0}),
                json!({"capabilities": {"drop": ["ALL"]}}),
                json!({}),
            ),
        ];
        for p in &ordinary {
            assert_eq!(posture_breach(p, PROXY), None, "{p:?}");
            assert!(inject(p, &InjectConfig::default(), &agent(), true).is_ok());
        }
    }

    #[test]
    fn injection_sets_allow_privilege_escalation_false_and_the_guard_requires_it() {
        let cfg = InjectConfig::default();
        let p = hostile(
            ok_psc(),
            json!({"readOnlyRootFilesystem": true}),
            json!({"initContainers": [{"name": "setup", "securityContext": {"allowPrivilegeEscalation": false}}],
                   "containers": [{"name": "a", "securityContext": {"readOnlyRootFilesystem": true}}, {"name": "b"}]}),
        );
        // Exactly the two that leave it unset, at the pod's own indices.
        assert_eq!(posture_patch(&p).len(), 2);
        for native in [true, false] {
            let out = apply(&p, &inject(&p, &cfg, &agent(), native).unwrap().unwrap());
            let spec = out.spec.as_ref().unwrap();
            let all: Vec<&Container> = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .collect();
            for name in ["a", "b", "setup"] {
                let c = all.iter().find(|c| c.name == name).unwrap();
                let sc = c.security_context.as_ref().unwrap();
                assert_eq!(sc.allow_privilege_escalation, Some(false), "{name} (native: {native})");
                if name == "a" {
                    assert_eq!(sc.read_only_root_filesystem, Some(true), "the rest is kept");
                }
            }
            // Mandate's own containers are left as injected (not patched).
            assert_eq!(injection_difference(&out, &cfg, &agent(), native), None);
            assert_eq!(inject(&out, &cfg, &agent(), native), Ok(None));
            // A forged injected pod (marker present) whose agent container
            // leaves it unset, or breaks any rule, is refused.
            let mut forged = serde_json::to_value(&out).unwrap();
            let b = forged["spec"]["containers"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|c| c["name"] == "b")
                .unwrap();
            b["securityContext"] = json!({});
            let unset: Pod = serde_json::from_value(forged.clone()).unwrap();
            let why = injection_difference(&unset, &cfg, &agent(), native).expect("refused");
            assert!(
                why.contains("container b") && why.contains("allowPrivilegeEscalation: false"),
                "{why}"
            );
            forged["spec"]["hostPID"] = json!(true);
            let host_pid: Pod = serde_json::from_value(forged).unwrap();
            let why = injection_difference(&host_pid, &cfg, &agent(), native).expect("refused");
            assert!(why.contains("hostPID"), "{why}");
            assert!(matches!(
                inject(&host_pid, &cfg, &agent(), native),
                Err(InjectError::Forged(ref w)) if w.contains("hostPID")
            ));
        }
    }
}
