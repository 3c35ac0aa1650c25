//! Admission of brokered credentials: a policy may broker only what the
//! user applying it may read (no confused deputy: the operator, which can
//! read every opted-in Secret and mint tokens, must not hand an agent a
//! credential its policy's author could not have taken themselves).
//!
//! For each credential of the new spec, on every create and update, a
//! SubjectAccessReview for the requesting user (name, uid, groups, extra,
//! from the AdmissionRequest): `get` on the Secret, or `create` on
//! `serviceaccounts/token` for the account, by name, in the policy's
//! namespace. Denied, or a review that fails: the policy is refused.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use mandate_api::crd::AgentPolicySpec;

use super::validate::Verdict;
use crate::broker::api_message;

/// Longest the reviews of one policy may take together.
pub const REVIEW_DEADLINE: Duration = Duration::from_secs(5);

/// One permission a credential asks of its author.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    /// Where the spec asks it, e.g. `spec.egress[0].credential.secretKeyRef`.
    pub field: String,
    pub verb: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    pub name: String,
}

impl Access {
    /// `get secrets "openai"`, `create serviceaccounts/token "reader"`.
    fn what(&self) -> String {
        match self.subresource {
            Some(sub) => format!("{} {}/{sub} {:?}", self.verb, self.resource, self.name),
            None => format!("{} {} {:?}", self.verb, self.resource, self.name),
        }
    }

    /// A Role rule that grants exactly this.
    fn rule(&self) -> String {
        let resource = match self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.to_string(),
        };
        format!(
            "a Role with apiGroups [\"\"], resources [{resource}], resourceNames [{}], verbs [{}]",
            self.name, self.verb
        )
    }
}

/// What the credentials of `spec` ask of whoever applies it.
pub fn accesses(spec: &AgentPolicySpec) -> Vec<Access> {
    let mut out = Vec::new();
    for (i, dest) in spec.egress.iter().enumerate() {
        let Some(cred) = &dest.credential else { continue };
        if let Some(r) = &cred.secret_key_ref {
            out.push(Access {
                field: format!("spec.egress[{i}].credential.secretKeyRef"),
                verb: "get",
                resource: "secrets",
                subresource: None,
                name: r.name.clone(),
            });
        }
        if let Some(t) = &cred.service_account_token {
            out.push(Access {
                field: format!("spec.egress[{i}].credential.serviceAccountToken"),
                verb: "create",
                resource: "serviceaccounts",
                subresource: Some("token"),
                name: t.service_account_name.clone(),
            });
        }
    }
    out
}

/// With brokering off, a policy naming any credential is refused.
pub fn refuse_when_off(spec: &AgentPolicySpec) -> Verdict {
    let named: Vec<String> = spec
        .egress
        .iter()
        .enumerate()
        .filter(|(_, d)| d.credential.is_some())
        .map(|(i, d)| format!("spec.egress[{i}] ({}:{})", d.host, d.port))
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} name(s) a credential, but {}; remove the credential or ask the cluster's admin to enable it",
        named.join(", "),
        crate::broker::OFF
    ))
}

/// The user's name as messages show it.
fn who(user: &UserInfo) -> String {
    match user.username.as_deref() {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => "the requesting user (no name in the request)".into(),
    }
}

/// Whether `user` may do each of `accesses` in `ns`, by SubjectAccessReview.
/// The first refusal (or failed review) is the answer.
pub async fn review(client: &Client, ns: &str, user: &UserInfo, mut accesses: Vec<Access>) -> Verdict {
    // One review per permission, whichever destinations repeat it.
    accesses.sort_by(|a, b| {
        (a.verb, a.resource, a.subresource, &a.name).cmp(&(b.verb, b.resource, b.subresource, &b.name))
    });
    accesses
        .dedup_by(|a, b| (a.verb, a.resource, a.subresource, &a.name) == (b.verb, b.resource, b.subresource, &b.name));
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let reviews = accesses.iter().map(|a| {
        let api = api.clone();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                uid: user.uid.clone(),
                groups: user.groups.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.to_string()),
                    verb: Some(a.verb.into()),
                    group: Some(String::new()),
                    resource: Some(a.resource.into()),
                    subresource: a.subresource.map(str::to_string),
                    name: Some(a.name.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        async move { (a, api.create(&PostParams::default(), &review).await) }
    });
    let answers = match tokio::time::timeout(REVIEW_DEADLINE, futures::future::join_all(reviews)).await {
        Ok(answers) => answers,
        Err(_) => {
            return Err(format!(
                "the SubjectAccessReviews of this policy's credentials took longer than {}s; refused, since Mandate cannot tell whether {} may read them (retry)",
                REVIEW_DEADLINE.as_secs(),
                who(user)
            ));
        }
    };
    for (a, answer) in answers {
        let user_name = who(user);
        match answer {
            Ok(r) => {
                let status = r.status.unwrap_or_default();
                if status.allowed && !status.denied.unwrap_or(false) {
                    continue;
                }
                let why = [status.reason, status.evaluation_error]
                    .into_iter()
                    .flatten()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(format!(
                    "{user_name} may not {} in namespace {ns} ({}), so this policy may not broker it: a policy brokers only credentials its author could read themselves. \
                     Grant {user_name} {} bound in {ns}, or have the policy applied by someone who may{}",
                    a.what(),
                    a.field,
                    a.rule(),
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(" (the apiserver: {why})")
                    }
                ));
            }
            Err(e) => {
                return Err(format!(
                    "the SubjectAccessReview of whether {user_name} may {} in namespace {ns} ({}) failed: {}; refused, since Mandate cannot tell (retry)",
                    a.what(),
                    a.field,
                    api_message(&e)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(egress: serde_json::Value) -> AgentPolicySpec {
        serde_json::from_value(json!({"modules": [], "egress": egress})).unwrap()
    }

    #[test]
    fn each_credential_asks_for_its_own_permission() {
        let s = spec(json!([
            {"host": "a.example", "port": 443},
            {"host": "b.example", "port": 443, "credential": {"secretKeyRef": {"name": "openai", "key": "k"}}},
            {"host": "c.example", "port": 443, "credential": {"serviceAccountToken": {"serviceAccountName": "reader"}}},
        ]));
        let a = accesses(&s);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].what(), "get secrets \"openai\"");
        assert_eq!(a[0].field, "spec.egress[1].credential.secretKeyRef");
        assert_eq!(a[1].what(), "create serviceaccounts/token \"reader\"");
        assert!(
            a[1].rule()
                .contains("resources [serviceaccounts/token], resourceNames [reader], verbs [create]")
        );
        let off = refuse_when_off(&s).unwrap_err();
        assert!(
            off.contains("spec.egress[1] (b.example:443), spec.egress[2] (c.example:443)"),
            "{off}"
        );
        assert!(off.contains("credentialBrokering.enabled"), "{off}");
        assert!(refuse_when_off(&spec(json!([{"host": "a.example", "port": 443}]))).is_ok());
    }
}
