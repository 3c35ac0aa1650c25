//! What the pod webhook adds to an agent pod: Envoy as the agent's egress
//! proxy, mandate-sidecar as Envoy's ext_authz, their volumes, and the proxy
//! environment on the agent's containers. Pure functions of the pod and the
//! configuration, so the same pod always gets the same patch.
//!
//! - `config`: how pods are injected ([`InjectConfig`]) and who the pod is ([`AgentRef`]);
//! - `containers`: the two containers (the sidecar's environment is a
//!   [`mandate_api::env::SidecarEnv`]) and their volumes;
//! - `envoy`: Envoy's bootstrap;
//! - `posture`: what Pod Security baseline would refuse in the agent's own
//!   containers, refused by Mandate itself (the namespace allows `privileged`
//!   for the egress rules' init container);
//! - `verify`: whether a pod holds exactly what is injected (re-invocation, the guard);
//! - `patch`: the JSON patch that injects a pod.

mod config;
mod containers;
mod envoy;
mod patch;
mod posture;
mod verify;

pub use config::{AgentRef, InjectConfig};
pub use containers::{containers, sidecar_env};
pub use envoy::{Sockets, envoy_bootstrap, envoy_bootstrap_at};
pub use patch::{InjectError, Injection, inject};
pub use posture::{MANDATE_CONTAINERS, posture_breach};
pub use verify::{
    RESERVED_VOLUMES, digest, injected_as_expected, injection_difference, isolation_breach, svid_eligible,
};

/// Pods and helpers the tests of every part share.
#[cfg(test)]
mod testing {
    use super::{AgentRef, Injection};
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::{Value, json};

    /// An agent pod (two containers, one setting NO_PROXY; UID 1000 in the
    /// pod's securityContext), with `extra`'s top-level fields replacing its
    /// own (a `spec` without a securityContext still gets UID 1000).
    pub(super) fn pod(extra: Value) -> Pod {
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
        if let Some(spec) = p.get_mut("spec").and_then(Value::as_object_mut) {
            spec.entry("securityContext")
                .or_insert_with(|| json!({"runAsUser": 1000, "runAsNonRoot": true}));
        }
        serde_json::from_value(p).unwrap()
    }

    /// `p` with the injection's patch applied.
    pub(super) fn apply(p: &Pod, inj: &Injection) -> Pod {
        let mut v = serde_json::to_value(p).unwrap();
        json_patch::patch(&mut v, &inj.patch).unwrap();
        serde_json::from_value(v).unwrap()
    }

    pub(super) fn agent() -> AgentRef {
        AgentRef {
            identity: Some("x".into()),
            spiffe_id: Some("spiffe://example.org/ns/ns/agent/x".into()),
        }
    }
}
