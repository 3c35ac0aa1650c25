//! What the validating webhooks decide: policies that would not compile or
//! whose tests fail, identities that are malformed or overlap another, and
//! approvals changed in any way but their decision. Pure functions; the
//! handlers in `mod.rs` feed them the objects.

use mandate_core::selector::Selector;

use mandate_api::crd::{AgentApproval, AgentIdentitySpec, AgentPolicySpec, ApprovalPhase};
use mandate_core::spiffe_id as identity;
use mandate_policy::{self as policy, PolicyError};

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

/// An AgentIdentity must resolve to a SPIFFE ID in the trust domain under
/// its namespace that no other identity in the namespace resolves to, have a
/// selector that selects something but not everything, and claim no pod
/// another identity in its namespace could also claim.
pub fn identity(
    name: &str,
    namespace: &str,
    spec: &AgentIdentitySpec,
    trust_domain: &str,
    others: &[(String, AgentIdentitySpec)],
) -> Verdict {
    let id = identity::spiffe_id(spec.spiffe_id_template.as_deref(), trust_domain, namespace, name)
        .map_err(|e| format!("spec.spiffeIdTemplate: {e}"))?;
    for (other, other_spec) in others.iter().filter(|(o, _)| o != name) {
        let theirs = identity::spiffe_id(other_spec.spiffe_id_template.as_deref(), trust_domain, namespace, other);
        if theirs.is_ok_and(|t| t == id) {
            return Err(format!(
                "spec.spiffeIdTemplate resolves to {id}, the SPIFFE ID of AgentIdentity {other}: a SPIFFE ID names one agent; put {{name}} in the template"
            ));
        }
    }
    let selector = Selector::try_from(&spec.selector).map_err(|e| format!("spec.selector: {e}"))?;
    if selector.selects_by_absence() {
        return Err(mandate_api::crd::SELECTS_BY_ABSENCE.into());
    }
    if let Some(ttl) = &spec.svid_ttl {
        parse_duration(ttl).map_err(|e| format!("spec.svidTtl: {e}"))?;
    }
    for (other, other_spec) in others {
        if other != name && may_overlap(&spec.selector, &other_spec.selector) {
            return Err(format!(
                "spec.selector can select the same pods as AgentIdentity {other}: an agent's pods must have exactly one identity; make the selectors exclusive (e.g. different values of one label)"
            ));
        }
    }
    Ok(())
}

use mandate_core::binding::may_overlap;
use mandate_core::duration::parse_duration;

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

fn jiff_now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}
