//! Drift of Mandate's own webhook configurations.
//!
//! Mediation rests on a few webhooks: the injector and the pod guard (every
//! agent pod of an enforced namespace goes through them), the namespace
//! guard (the opt-in cannot be taken back while agents run) and the policy
//! and identity validators. Whoever may edit a webhook configuration can
//! turn one off without touching Mandate: delete it, set the guard to
//! `Ignore`, narrow its rules, or add an `objectSelector` that a pod's own
//! label satisfies (the agent's author could then opt its pods out). The
//! operator cannot tell an intended change from a hostile one, and does not
//! write them back (Helm or GitOps owns them): it checks them every round
//! against what mediation needs, and reports each problem in the metric
//! `mandate_operator_webhook_drift{kind,configuration,webhook}`, a log line, and a
//! Warning Event `WebhookDrift` on the configuration when it first appears.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, RuleWithOperations, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use mandate_api::names::ENFORCE_LABEL;
use mandate_core::selector::Selector;

use crate::admin::{DriftLabels, Metrics};

/// One webhook, whichever kind of configuration holds it.
struct Hook<'a> {
    name: &'a str,
    rules: &'a [RuleWithOperations],
    failure_policy: Option<&'a str>,
    namespace_selector: Option<&'a LabelSelector>,
    object_selector: Option<&'a LabelSelector>,
}

/// What mediation needs of one webhook.
struct Need {
    /// `mutating` or `validating`.
    kind: &'static str,
    name: &'static str,
    /// `(operation, resource)` pairs (core group, v1) its rules must cover.
    covers: &'static [(&'static str, &'static str)],
    /// Whether it must fail closed.
    fail: bool,
    /// Pod webhooks: no objectSelector (a pod's own labels would choose),
    /// and a namespaceSelector that selects every enforced namespace.
    pods: bool,
    /// The namespace guard: its selectors select every enforced namespace.
    namespaces: bool,
}

const NEEDS: &[Need] = &[
    Need {
        kind: "mutating",
        name: "pods.mandate.dev",
        covers: &[("CREATE", "pods")],
        fail: false, // webhook.failurePolicy is the admin's; the guard below is Fail
        pods: true,
        namespaces: false,
    },
    Need {
        kind: "validating",
        name: "pods.mandate.dev",
        covers: &[
            ("CREATE", "pods"),
            ("UPDATE", "pods"),
            ("UPDATE", "pods/ephemeralcontainers"),
        ],
        fail: true,
        pods: true,
        namespaces: false,
    },
    Need {
        kind: "validating",
        name: "namespaces.mandate.dev",
        covers: &[("UPDATE", "namespaces")],
        fail: true,
        pods: false,
        namespaces: true,
    },
];

/// A problem with one webhook (`webhook` is `-` when the configuration is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `mutating` or `validating`.
    pub kind: &'static str,
    pub configuration: String,
    pub webhook: String,
    pub problem: String,
}

fn covers(rules: &[RuleWithOperations], op: &str, resource: &str) -> bool {
    let has = |v: &Option<Vec<String>>, want: &str| v.iter().flatten().any(|x| x == want || x == "*");
    rules.iter().any(|r| {
        has(&r.api_groups, "")
            && has(&r.api_versions, "v1")
            && has(&r.operations, op)
            && (has(&r.resources, resource)
                || (resource.contains('/') && r.resources.iter().flatten().any(|x| x == "*/*")))
    })
}

/// Whether `selector` (absent: everything) selects `labels`; an unusable
/// selector selects nothing here, which reports it.
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_none_or(|s| {
        serde_json::to_value(s)
            .and_then(serde_json::from_value::<mandate_api::crd::LabelSelector>)
            .ok()
            .and_then(|s| Selector::try_from(&s).ok())
            .is_some_and(|s| s.matches(labels))
    })
}

fn empty(selector: Option<&LabelSelector>) -> bool {
    selector.is_none_or(|s| {
        s.match_labels.as_ref().is_none_or(BTreeMap::is_empty) && s.match_expressions.as_ref().is_none_or(Vec::is_empty)
    })
}

/// What is wrong with `hook` for `need`, given the enforced namespaces.
fn problems(need: &Need, hook: &Hook<'_>, enforced: &[(String, BTreeMap<String, String>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (op, resource) in need.covers {
        if !covers(hook.rules, op, resource) {
            out.push(format!("its rules no longer cover {op} of {resource}"));
        }
    }
    if need.fail && hook.failure_policy != Some("Fail") {
        out.push(format!(
            "failurePolicy is {} (must be Fail: otherwise it lets everything through while the operator is away)",
            hook.failure_policy.unwrap_or("unset")
        ));
    }
    if need.pods && !empty(hook.object_selector) {
        out.push("it has an objectSelector: a pod's own labels would decide whether it is mediated".into());
    }
    let missed: Vec<&str> = enforced
        .iter()
        .filter(|(_, labels)| {
            !selects(hook.namespace_selector, labels) || (need.namespaces && !selects(hook.object_selector, labels))
        })
        .map(|(name, _)| name.as_str())
        .collect();
    if (need.pods || need.namespaces) && !missed.is_empty() {
        let shown: Vec<&str> = missed.iter().take(5).copied().collect();
        out.push(format!(
            "its selectors no longer select the enforced namespace(s) {}{}",
            shown.join(", "),
            if missed.len() > shown.len() {
                format!(" and {} more", missed.len() - shown.len())
            } else {
                String::new()
            }
        ));
    }
    out
}

/// Check the named configurations (`None`: not found) against [`NEEDS`].
pub fn check(
    mutating: &[(String, Option<MutatingWebhookConfiguration>)],
    validating: &[(String, Option<ValidatingWebhookConfiguration>)],
    enforced: &[(String, BTreeMap<String, String>)],
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let missing = |kind: &'static str, configuration: &str| Finding {
        kind,
        configuration: configuration.to_string(),
        webhook: "-".into(),
        problem: "the webhook configuration is gone: nothing is injected or guarded".into(),
    };
    // The two kinds' webhooks have the same fields, in different types.
    macro_rules! hooks_of {
        ($kind:literal, $configs:expr) => {
            $configs.iter().flat_map(|(name, cfg)| {
                if cfg.is_none() {
                    findings.push(missing($kind, name));
                }
                cfg.iter()
                    .flat_map(|c| c.webhooks.iter().flatten())
                    .map(move |w| {
                        let hook = Hook {
                            name: &w.name,
                            rules: w.rules.as_deref().unwrap_or_default(),
                            failure_policy: w.failure_policy.as_deref(),
                            namespace_selector: w.namespace_selector.as_ref(),
                            object_selector: w.object_selector.as_ref(),
                        };
                        ($kind, name.as_str(), hook)
                    })
            })
        };
    }
    let mut hooks: Vec<(&'static str, &str, Hook<'_>)> = hooks_of!("mutating", mutating).collect();
    hooks.extend(hooks_of!("validating", validating));
    for need in NEEDS {
        let of_kind: Vec<&(&str, &str, Hook<'_>)> = hooks
            .iter()
            .filter(|(kind, _, h)| *kind == need.kind && h.name == need.name)
            .collect();
        // The configuration a missing webhook is reported on: the first of its kind that exists.
        let first_config = if need.kind == "mutating" {
            mutating.iter().find(|(_, c)| c.is_some()).map(|(n, _)| n.clone())
        } else {
            validating.iter().find(|(_, c)| c.is_some()).map(|(n, _)| n.clone())
        };
        match (of_kind.as_slice(), first_config) {
            (_, None) => {} // the configuration itself is reported missing
            ([], Some(configuration)) => findings.push(Finding {
                kind: need.kind,
                configuration,
                webhook: need.name.into(),
                problem: format!("the {} webhook {} is gone", need.kind, need.name),
            }),
            (found, Some(_)) => {
                for (_, configuration, hook) in found {
                    for problem in problems(need, hook, enforced) {
                        findings.push(Finding {
                            kind: need.kind,
                            configuration: (*configuration).to_string(),
                            webhook: need.name.into(),
                            problem,
                        });
                    }
                }
            }
        }
    }
    findings
}

/// The enforced namespaces (restricted to `only` when the operator watches
/// one), with their labels, excluding those Mandate never mediates.
fn enforced_namespaces(
    namespaces: &Store<Namespace>,
    only: Option<&str>,
    operator_ns: &str,
) -> Vec<(String, BTreeMap<String, String>)> {
    let mut out: Vec<_> = namespaces
        .state()
        .iter()
        .filter(|n| n.labels().get(ENFORCE_LABEL).map(String::as_str) == Some("true"))
        .map(|n| (n.name_any(), n.labels().clone()))
        .filter(|(name, _)| name != "kube-system" && name != operator_ns && only.is_none_or(|o| o == name))
        .collect();
    out.sort();
    out
}

async fn read<K>(client: &Client, names: &[String]) -> Result<Vec<(String, Option<K>)>, kube::Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::all(client.clone());
    let mut out = Vec::new();
    for name in names {
        out.push((name.clone(), api.get_opt(name).await?));
    }
    Ok(out)
}

/// The named mutating configurations, as read (`None`: not found).
pub type Mutating = Vec<(String, Option<MutatingWebhookConfiguration>)>;
/// The named validating configurations, as read (`None`: not found).
pub type Validating = Vec<(String, Option<ValidatingWebhookConfiguration>)>;

/// What the watch needs.
#[allow(missing_debug_implementations)] // Recorder and Store are not Debug
pub struct DriftWatch {
    pub client: Client,
    pub mutating: Vec<String>,
    pub validating: Vec<String>,
    pub namespaces: Store<Namespace>,
    pub watch_namespace: Option<String>,
    pub operator_namespace: String,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub every: Duration,
}

impl DriftWatch {
    /// Check every `every`, for as long as the operator runs.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // (kind, configuration, webhook) → problems last reported.
        let mut last: BTreeMap<Key, Vec<String>> = BTreeMap::new();
        loop {
            tick.tick().await;
            let (m, v) = match (
                read::<MutatingWebhookConfiguration>(&self.client, &self.mutating).await,
                read::<ValidatingWebhookConfiguration>(&self.client, &self.validating).await,
            ) {
                (Ok(m), Ok(v)) => (m, v),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the webhook configurations to check them; retrying");
                    continue;
                }
            };
            let enforced = enforced_namespaces(
                &self.namespaces,
                self.watch_namespace.as_deref(),
                &self.operator_namespace,
            );
            let mut now: BTreeMap<Key, Vec<String>> = BTreeMap::new();
            for f in check(&m, &v, &enforced) {
                now.entry((f.kind, f.configuration, f.webhook))
                    .or_default()
                    .push(f.problem);
            }
            for key in last.keys().filter(|k| !now.contains_key(*k)) {
                tracing::info!(kind = key.0, configuration = %key.1, webhook = %key.2, "webhook configuration drift resolved");
            }
            // Every checked pair has a series: 0 is a check that found nothing.
            for key in checked(&self.mutating, &self.validating).filter(|k| !now.contains_key(k)) {
                self.metrics.webhook_drift.get_or_create(&labels(&key)).set(0);
            }
            for key in last.keys().filter(|k| !now.contains_key(*k)) {
                self.metrics.webhook_drift.get_or_create(&labels(key)).set(0);
            }
            for (key, problems) in &now {
                self.metrics.webhook_drift.get_or_create(&labels(key)).set(1);
                if last.get(key) == Some(problems) {
                    continue;
                }
                let note = format!("{} webhook {}: {}", key.0, key.2, problems.join("; "));
                // The recorder folds events of one object with the same reason
                // and action into a series that keeps the first note: the
                // action names the webhook and what is wrong with it.
                let action = format!("Check {} {}", key.2, short_digest(&note));
                tracing::warn!(kind = key.0, configuration = %key.1, webhook = %key.2, problems = %problems.join("; "), "webhook configuration drift: mediation is weakened");
                self.publish(key.0, &key.1, &m, &v, note, action).await;
            }
            last = now;
        }
    }

    /// A Warning Event on the configuration `name` (when it still exists).
    async fn publish(
        &self,
        kind: &str,
        name: &str,
        m: &[(String, Option<MutatingWebhookConfiguration>)],
        v: &[(String, Option<ValidatingWebhookConfiguration>)],
        note: String,
        action: String,
    ) {
        let reference = if kind == "mutating" {
            m.iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, c)| c.as_ref().map(|c| c.object_ref(&())))
        } else {
            v.iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, c)| c.as_ref().map(|c| c.object_ref(&())))
        };
        let Some(reference) = reference else { return };
        let event = Event {
            type_: EventType::Warning,
            reason: "WebhookDrift".into(),
            note: Some(note.chars().take(1000).collect()),
            action,
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, configuration = %name, "could not publish the drift event");
        }
    }
}

/// The (configuration, webhook) pairs a round checks: each configuration
/// (`-`) and each needed webhook of its kind.
fn checked<'a>(mutating: &'a [String], validating: &'a [String]) -> impl Iterator<Item = Key> + 'a {
    let of = |names: &'a [String], kind: &'static str| {
        names.iter().flat_map(move |c| {
            std::iter::once((kind, c.clone(), "-".to_string())).chain(
                NEEDS
                    .iter()
                    .filter(move |n| n.kind == kind)
                    .map(move |n| (kind, c.clone(), n.name.to_string())),
            )
        })
    };
    of(mutating, "mutating").chain(of(validating, "validating"))
}

/// 8 hex digits of a sha256 of `text`.
fn short_digest(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `(kind, configuration, webhook)`.
type Key = (&'static str, String, String);

fn labels(key: &Key) -> DriftLabels {
    DriftLabels {
        kind: key.0,
        configuration: key.1.clone(),
        webhook: key.2.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn configs(mutating: serde_json::Value, validating: serde_json::Value) -> (Mutating, Validating) {
        let m = serde_json::from_value(json!({"metadata": {"name": "m"}, "webhooks": mutating})).ok();
        let v = serde_json::from_value(json!({"metadata": {"name": "v"}, "webhooks": validating})).ok();
        (vec![("m".into(), m)], vec![("v".into(), v)])
    }

    fn hook(name: &str, ops: &[&str], resources: &[&str], fail: &str) -> serde_json::Value {
        json!({
            "name": name, "clientConfig": {"url": "https://127.0.0.1:1/x"},
            "rules": [{"operations": ops, "apiGroups": [""], "apiVersions": ["v1"], "resources": resources}],
            "namespaceSelector": {"matchLabels": {ENFORCE_LABEL: "true"}},
            "failurePolicy": fail, "sideEffects": "None", "admissionReviewVersions": ["v1"],
        })
    }

    fn chart_like() -> (serde_json::Value, serde_json::Value) {
        let mut ns = hook("namespaces.mandate.dev", &["UPDATE"], &["namespaces"], "Fail");
        ns["objectSelector"] = ns["namespaceSelector"].take();
        (
            json!([hook("pods.mandate.dev", &["CREATE"], &["pods"], "Ignore")]),
            json!([
                hook(
                    "pods.mandate.dev",
                    &["CREATE", "UPDATE"],
                    &["pods", "pods/ephemeralcontainers"],
                    "Fail"
                ),
                ns
            ]),
        )
    }

    fn enforced() -> Vec<(String, BTreeMap<String, String>)> {
        vec![(
            "agents".into(),
            BTreeMap::from([(ENFORCE_LABEL.to_string(), "true".to_string())]),
        )]
    }

    fn problems_of(m: serde_json::Value, v: serde_json::Value) -> Vec<String> {
        let (m, v) = configs(m, v);
        check(&m, &v, &enforced())
            .into_iter()
            .map(|f| format!("{}/{}: {}", f.configuration, f.webhook, f.problem))
            .collect()
    }

    #[test]
    fn the_charts_configuration_has_no_drift() {
        let (m, v) = chart_like();
        assert_eq!(problems_of(m, v), Vec::<String>::new());
    }

    #[test]
    fn each_way_of_switching_mediation_off_is_reported() {
        type Change = Box<dyn Fn(&mut serde_json::Value, &mut serde_json::Value)>;
        let cases: Vec<(&str, Change, &str)> = vec![
            (
                "the guard set to Ignore",
                Box::new(|_, v| v[0]["failurePolicy"] = json!("Ignore")),
                "v/pods.mandate.dev: failurePolicy is Ignore",
            ),
            (
                "the guard's UPDATE dropped",
                Box::new(|_, v| v[0]["rules"][0]["operations"] = json!(["CREATE"])),
                "v/pods.mandate.dev: its rules no longer cover UPDATE of pods",
            ),
            (
                "an objectSelector an agent's label satisfies",
                Box::new(|m, _| {
                    m[0]["objectSelector"] = json!({"matchExpressions": [{"key": "skip", "operator": "DoesNotExist"}]})
                }),
                "m/pods.mandate.dev: it has an objectSelector",
            ),
            (
                "the injector narrowed to other namespaces",
                Box::new(|m, _| m[0]["namespaceSelector"]["matchLabels"]["team"] = json!("x")),
                "m/pods.mandate.dev: its selectors no longer select the enforced namespace(s) agents",
            ),
            (
                "the namespace guard removed",
                Box::new(|_, v| {
                    if let Some(a) = v.as_array_mut() {
                        a.truncate(1);
                    }
                }),
                "v/namespaces.mandate.dev: the validating webhook namespaces.mandate.dev is gone",
            ),
            (
                "the namespace guard's objectSelector narrowed",
                Box::new(|_, v| v[1]["objectSelector"]["matchLabels"]["team"] = json!("x")),
                "v/namespaces.mandate.dev: its selectors no longer select",
            ),
        ];
        for (what, change, want) in cases {
            let (mut m, mut v) = chart_like();
            change(&mut m, &mut v);
            let found = problems_of(m, v);
            assert!(found.iter().any(|p| p.starts_with(want)), "{what}: {found:?}");
        }
        let (_, v) = chart_like();
        let (_, v) = configs(json!([]), v);
        let gone = check(&[("m".into(), None)], &v, &enforced());
        assert!(
            gone.iter()
                .any(|f| f.configuration == "m" && f.problem.contains("is gone")),
            "{gone:?}"
        );
    }
}
