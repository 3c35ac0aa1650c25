//! What the validating webhooks decide: policies that would not compile or
//! whose tests fail, identities that are malformed or overlap another, and
//! approvals changed in any way but their decision. Pure functions; the
//! handlers in `mod.rs` feed them the objects.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::Selector;

use crate::crd::{AgentApproval, AgentIdentitySpec, AgentPolicySpec, ApprovalPhase};
use crate::identity;
use crate::policy::{self, PolicyError};

/// `Ok(())`, or why the object is refused (shown by kubectl as is).
pub type Verdict = Result<(), String>;

/// An AgentPolicy is admitted only if it compiles and every test passes.
pub fn policy(spec: &AgentPolicySpec) -> Verdict {
    match policy::run_tests(spec) {
        Ok(report) if report.all_passed() => Ok(()),
        Ok(report) => Err(format!("the policy's tests fail: {}", report.summary())),
        Err(PolicyError::Rego(msg)) => Err(format!("the policy does not compile: {msg}")),
        Err(e) => Err(format!("the policy is not valid: {e}")),
    }
}

/// An AgentIdentity must resolve to a SPIFFE ID in the trust domain, have a
/// selector that selects something but not everything, and claim no pod
/// another identity in its namespace could also claim.
pub fn identity(
    name: &str,
    namespace: &str,
    spec: &AgentIdentitySpec,
    trust_domain: &str,
    others: &[(String, LabelSelector)],
) -> Verdict {
    identity::spiffe_id(spec.spiffe_id_template.as_deref(), trust_domain, namespace, name)
        .map_err(|e| format!("spec.spiffeIdTemplate: {e}"))?;
    let selector = Selector::try_from(spec.selector.clone()).map_err(|e| format!("spec.selector: {e}"))?;
    if selector.selects_all() {
        return Err(
            "spec.selector is empty: it would make every pod in the namespace this agent; select the agent's pods by label"
                .into(),
        );
    }
    if let Some(ttl) = &spec.svid_ttl {
        parse_duration(ttl).map_err(|e| format!("spec.svidTtl: {e}"))?;
    }
    for (other, sel) in others {
        if other != name && may_overlap(&spec.selector, sel) {
            return Err(format!(
                "spec.selector can select the same pods as AgentIdentity {other}: an agent's pods must have exactly one identity; make the selectors exclusive (e.g. different values of one label)"
            ));
        }
    }
    Ok(())
}

/// `10m`, `1h`, `90s`: seconds. SVID lifetimes from one minute to a day.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 10m, 1h or 90s"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("'{s}' is not a duration like 10m, 1h or 90s")),
    };
    if !(60..=86_400).contains(&secs) {
        return Err(format!("'{s}' is out of range: SVIDs live from 1m to 24h"));
    }
    Ok(secs)
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
/// against NotIn, Exists against DoesNotExist).
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

/// An approval's spec never changes; its status only goes from Pending to
/// Approved or Denied (by a person, recorded as who sent the request) or to
/// Expired (by the operator), once.
pub fn approval_update(old: &AgentApproval, new: &AgentApproval, user: &str, operator_user: &str) -> Verdict {
    if old.spec != new.spec {
        return Err("an AgentApproval's spec cannot change; only its decision (status.phase) can".into());
    }
    let (o, n) = (
        old.status.clone().unwrap_or_default(),
        new.status.clone().unwrap_or_default(),
    );
    if o == n {
        return Ok(());
    }
    if o.phase != ApprovalPhase::Pending {
        return Err(format!(
            "this approval was already decided ({:?} by {}); a decision cannot change",
            o.phase,
            o.decided_by.as_deref().unwrap_or("the operator")
        ));
    }
    match n.phase {
        ApprovalPhase::Pending => Err("status.decidedBy and status.decidedAt are set by Mandate, not by hand".into()),
        ApprovalPhase::Expired if user != operator_user => {
            Err("only Mandate's operator marks an approval Expired".into())
        }
        ApprovalPhase::Expired => Ok(()),
        ApprovalPhase::Approved | ApprovalPhase::Denied => {
            if n.decided_by.as_deref() != Some(user) {
                return Err(format!(
                    "status.decidedBy must be the user who decides ({user}); Mandate records it from the request"
                ));
            }
            if n.decided_at.is_none() {
                return Err("status.decidedAt is missing".into());
            }
            let expired = new.spec.expires_at.0 < jiff_now();
            if expired {
                return Err("this approval has expired; the action stays denied".into());
            }
            Ok(())
        }
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

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

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5s").is_err());
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("m").is_err());
    }
}
