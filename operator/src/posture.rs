//! Posture: the long-lived credentials an agent's pods still hold, how
//! broad its service account's RBAC is, and which of the destinations its
//! policies declare get a brokered credential, so that admins can see what
//! to move to brokered credentials (issue 16). The identity reconciler
//! writes it into AgentIdentity `status.posture` and the gauge
//! `mandate_operator_agent_posture{namespace,identity,kind}`; `mandate
//! agents` prints it.
//!
//! RBAC is never re-implemented: each probe is a SubjectAccessReview the
//! apiserver answers for the service account.

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};
use mandate_api::crd::{AgentPolicySpec, EgressPosture};
use mandate_api::names::{ENVOY_CONTAINER, INIT_CONTAINER, SIDECAR_CONTAINER};
use std::collections::BTreeMap;

use crate::webhook::inject::RESERVED_VOLUMES;

/// A credential one pod holds, for the report: what it is and where.
pub fn held_credentials(pod: &Pod, service_account: Option<&ServiceAccount>) -> Vec<String> {
    let Some(spec) = &pod.spec else { return vec![] };
    let ours = |name: &str| name == ENVOY_CONTAINER || name == SIDECAR_CONTAINER || name == INIT_CONTAINER;
    let mut out = Vec::new();
    for v in spec.volumes.iter().flatten() {
        if RESERVED_VOLUMES.contains(&v.name.as_str()) {
            continue;
        }
        if let Some(s) = &v.secret {
            out.push(format!(
                "Secret {} mounted (volume {})",
                s.secret_name.as_deref().unwrap_or("?"),
                v.name
            ));
        }
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(s) = &source.secret {
                out.push(format!("Secret {} mounted (projected volume {})", s.name, v.name));
            }
            if source.service_account_token.is_some() && !v.name.starts_with("kube-api-access-") {
                out.push(format!("a service-account token (projected volume {})", v.name));
            }
        }
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| !ours(&c.name))
    {
        for e in c.env.iter().flatten() {
            if let Some(r) = e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) {
                out.push(format!(
                    "Secret {} key {} in env {} (container {})",
                    r.name, r.key, e.name, c.name
                ));
            }
        }
        for f in c.env_from.iter().flatten() {
            if let Some(r) = &f.secret_ref {
                out.push(format!("Secret {} as environment (container {})", r.name, c.name));
            }
        }
    }
    // The API token Kubernetes mounts unless told not to (the pod's setting
    // wins over the service account's).
    let automount = spec
        .automount_service_account_token
        .or_else(|| service_account.and_then(|sa| sa.automount_service_account_token))
        .unwrap_or(true);
    if automount {
        out.push(format!(
            "the service account {}'s API token (automounted)",
            spec.service_account_name.as_deref().unwrap_or("default")
        ));
    }
    out.sort();
    out.dedup();
    out
}

/// The destinations `policies` declare, one entry per host and port,
/// brokered when any of them brokers a credential for it (the sidecar then
/// adds it), sorted.
pub fn egress(policies: &[&AgentPolicySpec]) -> Vec<EgressPosture> {
    let mut by_dest: BTreeMap<(String, u16), bool> = BTreeMap::new();
    for d in policies.iter().flat_map(|p| p.egress.iter()) {
        let brokered = by_dest.entry((d.host.clone(), d.port)).or_insert(false);
        *brokered |= d.credential.is_some();
    }
    by_dest
        .into_iter()
        .map(|((host, port), brokered)| EgressPosture { host, port, brokered })
        .collect()
}

/// One RBAC probe: a verb on a resource, cluster-wide (`namespace` None) or
/// in the agent's namespace.
struct Probe {
    what: &'static str,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    cluster_wide: bool,
}

/// What is worth knowing about an agent's account: broad verbs, secrets,
/// escalation paths.
const PROBES: &[Probe] = &[
    Probe {
        what: "every verb on everything, cluster-wide (cluster-admin)",
        verb: "*",
        group: "*",
        resource: "*",
        cluster_wide: true,
    },
    Probe {
        what: "list Secrets in every namespace",
        verb: "list",
        group: "",
        resource: "secrets",
        cluster_wide: true,
    },
    Probe {
        what: "get Secrets in its namespace",
        verb: "get",
        group: "",
        resource: "secrets",
        cluster_wide: false,
    },
    Probe {
        what: "create pods in its namespace",
        verb: "create",
        group: "",
        resource: "pods",
        cluster_wide: false,
    },
    Probe {
        what: "exec into pods in its namespace",
        verb: "create",
        group: "",
        resource: "pods/exec",
        cluster_wide: false,
    },
    Probe {
        what: "mint service-account tokens in its namespace",
        verb: "create",
        group: "",
        resource: "serviceaccounts/token",
        cluster_wide: false,
    },
    Probe {
        what: "bind roles cluster-wide",
        verb: "create",
        group: "rbac.authorization.k8s.io",
        resource: "clusterrolebindings",
        cluster_wide: true,
    },
    Probe {
        what: "impersonate users",
        verb: "impersonate",
        group: "",
        resource: "users",
        cluster_wide: true,
    },
    Probe {
        what: "edit AgentPolicies in its namespace",
        verb: "update",
        group: "mandate.dev",
        resource: "agentpolicies",
        cluster_wide: false,
    },
];

/// The probes the service account `ns/sa` passes, asked of the apiserver.
/// A probe that cannot be asked is reported as unknown, never as absent.
pub async fn broad_rbac(client: &Client, ns: &str, sa: &str) -> Vec<String> {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let mut out = Vec::new();
    for p in PROBES {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!("system:serviceaccount:{ns}:{sa}")),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    namespace: (!p.cluster_wide).then(|| ns.to_string()),
                    verb: Some(p.verb.into()),
                    group: Some(p.group.into()),
                    resource: Some(p.resource.split('/').next().unwrap_or(p.resource).into()),
                    subresource: p.resource.split_once('/').map(|(_, s)| s.to_string()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        match api.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => out.push(p.what.to_string()),
            Ok(_) => {}
            Err(e) => out.push(format!("unknown whether it may {} (the review failed: {e})", p.what)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    #[test]
    fn the_credentials_a_pod_holds_are_listed_and_mandates_own_are_not() {
        let p = pod(json!({
            "serviceAccountName": "agent-sa",
            "containers": [{"name": "agent",
                "env": [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai", "key": "key"}}}],
                "envFrom": [{"secretRef": {"name": "github"}}]},
                {"name": "mandate-sidecar",
                 "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "ours", "key": "k"}}}]}],
            "volumes": [
                {"name": "creds", "secret": {"secretName": "aws"}},
                {"name": "mandate-token", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "audience": "mandate"}}]}},
                {"name": "kube-api-access-x", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
            ],
        }));
        let held = held_credentials(&p, None);
        for want in [
            "Secret openai key key in env OPENAI_API_KEY (container agent)",
            "Secret github as environment (container agent)",
            "Secret aws mounted (volume creds)",
            "the service account agent-sa's API token (automounted)",
        ] {
            assert!(held.iter().any(|h| h == want), "{want} not in {held:?}");
        }
        assert!(
            !held.iter().any(|h| h.contains("ours") || h.contains("mandate-token")),
            "{held:?}"
        );
    }

    #[test]
    fn egress_is_one_entry_per_destination_brokered_if_any_policy_brokers_it() {
        let spec = |egress: serde_json::Value| -> AgentPolicySpec {
            serde_json::from_value(json!({"modules": [], "egress": egress})).unwrap()
        };
        let a = spec(json!([
            {"host": "api.github.com", "port": 443},
            {"host": "api.openai.com", "port": 443, "credential": {"secretKeyRef": {"name": "o", "key": "k"}}},
        ]));
        let b = spec(json!([
            {"host": "api.github.com", "port": 443, "credential": {"serviceAccountToken": {"serviceAccountName": "sa"}}},
            {"host": "example.com", "port": 80},
        ]));
        let got: Vec<(String, u16, bool)> = egress(&[&a, &b])
            .into_iter()
            .map(|e| (e.host, e.port, e.brokered))
            .collect();
        assert_eq!(
            got,
            [
                ("api.github.com".to_string(), 443, true),
                ("api.openai.com".to_string(), 443, true),
                ("example.com".to_string(), 80, false),
            ]
        );
        assert!(egress(&[]).is_empty());
    }

    #[test]
    fn no_automounted_token_when_the_pod_or_its_account_says_so() {
        let off = pod(json!({"automountServiceAccountToken": false, "containers": [{"name": "agent"}]}));
        assert!(held_credentials(&off, None).is_empty());
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "sa"}, "automountServiceAccountToken": false})).unwrap();
        let plain = pod(json!({"containers": [{"name": "agent"}]}));
        assert!(held_credentials(&plain, Some(&sa)).is_empty());
        assert_eq!(held_credentials(&plain, None).len(), 1);
    }
}
