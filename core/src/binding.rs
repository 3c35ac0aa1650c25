//! Which AgentIdentity a pod is, and which AgentPolicies bind it. Every part
//! of Mandate that makes this decision (the injecting webhook, the SVID
//! signer, the policy distributor, the controllers, the CLI) calls these.
//!
//! The rules:
//! - an identity's selector selects a pod when it is well formed, selects
//!   by a label the pod carries (not only by labels it lacks: an empty or
//!   NotIn/DoesNotExist-only selector would make nearly every pod in the
//!   namespace the agent, so it selects none), and matches the pod's labels;
//! - a policy's `agentSelector` binds a pod when it is well formed, is not
//!   empty, and matches (a guardrail for "every agent but these" is fine);
//! - a pod is an agent when exactly one AgentIdentity in its namespace
//!   selects it; two is an error, never a choice;
//! - a policy binds an agent when it names the agent's identity, or when
//!   its `agentSelector` binds the agent's pod.

use std::collections::{BTreeMap, BTreeSet};

use mandate_api::crd::{AgentIdentitySpec, AgentPolicySpec};
use mandate_api::meta::LabelSelector;

use crate::selector::Selector;

/// Whether the identity `selector` selects a pod with `labels`.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector).is_ok_and(|s| !s.selects_by_absence() && s.matches(labels))
}

/// Whether a policy's `agentSelector` binds a pod with `labels`.
fn agent_selector_binds(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector).is_ok_and(|s| !s.selects_all() && s.matches(labels))
}

/// What the identities of a namespace make of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodIdentity<'a, T> {
    /// No identity selects it: it is not an agent.
    None,
    /// Exactly one does: its name and what the caller passed with it.
    One(&'a str, &'a T),
    /// More than one does (their names, sorted): it must not be treated as any.
    Ambiguous(Vec<String>),
}

/// The identity of a pod with `labels`, among `(name, spec, item)` of the
/// identities in its namespace.
pub fn identity_of_pod<'a, T, I>(identities: I, labels: &BTreeMap<String, String>) -> PodIdentity<'a, T>
where
    I: IntoIterator<Item = (&'a str, &'a AgentIdentitySpec, &'a T)>,
{
    let mut matching: Vec<(&'a str, &'a T)> = identities
        .into_iter()
        .filter(|(_, spec, _)| selects(&spec.selector, labels))
        .map(|(name, _, item)| (name, item))
        .collect();
    matching.sort_by(|a, b| a.0.cmp(b.0));
    match matching.as_slice() {
        [] => PodIdentity::None,
        [(name, item)] => PodIdentity::One(name, item),
        many => PodIdentity::Ambiguous(many.iter().map(|(n, _)| n.to_string()).collect()),
    }
}

/// Whether the policy `spec` binds the agent whose identity is `identity`
/// (when it has one) and whose pod has `labels`.
pub fn policy_binds(spec: &AgentPolicySpec, identity: Option<&str>, labels: &BTreeMap<String, String>) -> bool {
    identity.is_some_and(|id| spec.identities.iter().any(|i| i == id))
        || spec
            .agent_selector
            .as_ref()
            .is_some_and(|s| agent_selector_binds(s, labels))
}

/// What a selector demands of one label key.
#[derive(Debug, Default, Clone)]
struct KeyDemand {
    /// The value must be one of these (intersection of every In/=).
    allowed: Option<BTreeSet<String>>,
    /// The value must not be one of these.
    forbidden: BTreeSet<String>,
    /// The label must be absent.
    absent: bool,
    /// The label must be present.
    present: bool,
}

fn demands(sel: &LabelSelector) -> BTreeMap<String, KeyDemand> {
    let mut out: BTreeMap<String, KeyDemand> = BTreeMap::new();
    fn restrict(out: &mut BTreeMap<String, KeyDemand>, key: &str, values: BTreeSet<String>) {
        let d = out.entry(key.to_string()).or_default();
        d.present = true;
        d.allowed = Some(match d.allowed.take() {
            Some(a) => a.intersection(&values).cloned().collect(),
            None => values,
        });
    }
    for (k, v) in sel.match_labels.iter().flatten() {
        restrict(&mut out, k, BTreeSet::from([v.clone()]));
    }
    for e in sel.match_expressions.iter().flatten() {
        let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
        match e.operator.as_str() {
            "In" => restrict(&mut out, &e.key, values),
            "NotIn" => out.entry(e.key.clone()).or_default().forbidden.extend(values),
            "Exists" => out.entry(e.key.clone()).or_default().present = true,
            "DoesNotExist" => out.entry(e.key.clone()).or_default().absent = true,
            _ => {}
        }
    }
    out
}

/// Whether some pod's labels could satisfy both selectors: false only when
/// a key's demands contradict each other (different required values, In
/// against NotIn, Exists against DoesNotExist). Two identities whose
/// selectors may overlap could both claim a pod, so the webhook refuses the
/// second.
pub fn may_overlap(a: &LabelSelector, b: &LabelSelector) -> bool {
    let (da, db) = (demands(a), demands(b));
    for (key, x) in &da {
        let Some(y) = db.get(key) else { continue };
        let present = x.present || y.present;
        let absent = x.absent || y.absent;
        if present && absent {
            return false;
        }
        let allowed = match (&x.allowed, &y.allowed) {
            (Some(p), Some(q)) => Some(p.intersection(q).cloned().collect::<BTreeSet<_>>()),
            (Some(p), None) | (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        };
        if let Some(allowed) = allowed {
            let forbidden: BTreeSet<&String> = x.forbidden.iter().chain(&y.forbidden).collect();
            if allowed.iter().all(|v| forbidden.contains(v)) {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use mandate_api::crd::{PolicyMode, RegoModule};
    use mandate_api::meta::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            match_expressions: None,
        }
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|s| s.to_string()).collect()),
            }]),
        }
    }

    fn pod(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn identity(selector: LabelSelector) -> AgentIdentitySpec {
        AgentIdentitySpec {
            selector,
            spiffe_id_template: None,
            svid_ttl: None,
            principal: None,
            may_invoke: vec![],
            accept_delegation_from: vec![],
        }
    }

    fn policy(identities: &[&str], agent_selector: Option<LabelSelector>) -> AgentPolicySpec {
        AgentPolicySpec {
            agent_selector,
            identities: identities.iter().map(|s| s.to_string()).collect(),
            mode: PolicyMode::Enforce,
            modules: vec![RegoModule {
                name: "a.rego".into(),
                rego: "package a".into(),
            }],
            data: None,
            entrypoint: "data.a.decision".into(),
            tests: vec![],
            egress: vec![],
        }
    }

    #[test]
    fn an_empty_or_malformed_selector_binds_no_pod() {
        let any = pod(&[("app", "a")]);
        assert!(selects(&labels(&[("app", "a")]), &any));
        assert!(
            !selects(&LabelSelector::default(), &any),
            "an empty selector would bind every pod"
        );
        assert!(
            !selects(&expr("app", "Like", &["a"]), &any),
            "an unknown operator binds nothing"
        );
        assert!(!selects(&labels(&[("app", "b")]), &any));
    }

    #[test]
    fn a_pod_is_an_agent_only_when_exactly_one_identity_selects_it() {
        let (a, b, all) = (
            identity(labels(&[("app", "a")])),
            identity(expr("app", "In", &["a", "b"])),
            identity(LabelSelector::default()),
        );
        let ids = [("b-wide", &b, &2), ("a", &a, &1), ("everything", &all, &3)];
        let of = |l: &[(&str, &str)]| identity_of_pod(ids.iter().map(|(n, s, i)| (*n, *s, *i)), &pod(l));
        assert_eq!(of(&[("app", "b")]), PodIdentity::One("b-wide", &2));
        assert_eq!(
            of(&[("app", "a")]),
            PodIdentity::Ambiguous(vec!["a".into(), "b-wide".into()])
        );
        assert_eq!(
            of(&[("app", "c")]),
            PodIdentity::None,
            "the empty selector claims nothing"
        );
    }

    #[test]
    fn a_policy_binds_by_identity_name_or_by_agent_selector() {
        let p = pod(&[("app", "a")]);
        assert!(policy_binds(&policy(&["researcher"], None), Some("researcher"), &p));
        assert!(!policy_binds(&policy(&["researcher"], None), Some("writer"), &p));
        assert!(!policy_binds(&policy(&["researcher"], None), None, &p));
        assert!(policy_binds(&policy(&[], Some(labels(&[("app", "a")]))), None, &p));
        assert!(
            !policy_binds(&policy(&[], Some(LabelSelector::default())), None, &p),
            "an empty agentSelector binds nothing"
        );
        assert!(!policy_binds(&policy(&[], None), Some("researcher"), &p));
    }

    #[test]
    fn overlap_of_selectors() {
        assert!(may_overlap(&labels(&[("app", "a")]), &labels(&[("app", "a")])));
        assert!(may_overlap(&labels(&[("app", "a")]), &labels(&[("tier", "x")])));
        assert!(!may_overlap(&labels(&[("app", "a")]), &labels(&[("app", "b")])));
        assert!(!may_overlap(&labels(&[("app", "a")]), &expr("app", "NotIn", &["a"])));
        assert!(may_overlap(&labels(&[("app", "a")]), &expr("app", "In", &["a", "b"])));
        assert!(!may_overlap(
            &labels(&[("app", "a")]),
            &expr("app", "DoesNotExist", &[])
        ));
        assert!(may_overlap(&expr("app", "Exists", &[]), &labels(&[("app", "z")])));
    }
}
