//! Label selectors: Kubernetes' semantics, on Mandate's own types.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use mandate_api::meta::{LabelSelector, LabelSelectorRequirement};

/// A selector that is not well formed: it selects nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("operator '{operator}' on key '{key}' is not In, NotIn, Exists or DoesNotExist")]
    UnknownOperator { key: String, operator: String },
    #[error("operator {operator} on key '{key}' needs values")]
    MissingValues { key: String, operator: &'static str },
}

/// One requirement, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equal(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(Vec<Requirement>);

impl TryFrom<&LabelSelector> for Selector {
    type Error = SelectorError;

    fn try_from(sel: &LabelSelector) -> Result<Self, SelectorError> {
        let mut out: Vec<Requirement> = sel
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement::Equal(k.clone(), v.clone()))
            .collect();
        for r in sel.match_expressions.iter().flatten() {
            out.push(requirement(r)?);
        }
        Ok(Self(out))
    }
}

fn requirement(r: &LabelSelectorRequirement) -> Result<Requirement, SelectorError> {
    let key = r.key.clone();
    let values = |operator| {
        r.values
            .as_ref()
            .map(|v| v.iter().cloned().collect::<BTreeSet<_>>())
            .ok_or_else(|| SelectorError::MissingValues {
                key: r.key.clone(),
                operator,
            })
    };
    Ok(match r.operator.as_str() {
        "In" => Requirement::In(key, values("In")?),
        "NotIn" => Requirement::NotIn(key, values("NotIn")?),
        "Exists" => Requirement::Exists(key),
        "DoesNotExist" => Requirement::DoesNotExist(key),
        other => {
            return Err(SelectorError::UnknownOperator {
                key,
                operator: other.to_string(),
            });
        }
    })
}

impl Selector {
    /// Whether the selector has no requirement, and so matches every pod.
    pub fn selects_all(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the selector matches a pod with no labels at all: it is empty,
    /// or has only NotIn and DoesNotExist requirements, so it selects every
    /// pod that lacks a few labels (nearly every pod) rather than pods by a
    /// label they carry.
    pub fn selects_by_absence(&self) -> bool {
        self.matches(&BTreeMap::new())
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equal(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// The selector in the apiserver's query syntax (`app=a,tier in (x,y),!debug`),
/// for a filtered list.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| match r {
                Requirement::Equal(k, v) => format!("{k}={v}"),
                Requirement::In(k, vs) => format!("{k} in ({})", join(vs)),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", join(vs)),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn sel(labels: &[(&str, &str)], exprs: &[(&str, &str, Option<&[&str]>)]) -> LabelSelector {
        LabelSelector {
            match_labels: (!labels.is_empty())
                .then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            match_expressions: (!exprs.is_empty()).then(|| {
                exprs
                    .iter()
                    .map(|(k, op, vs)| LabelSelectorRequirement {
                        key: k.to_string(),
                        operator: op.to_string(),
                        values: vs.map(|vs| vs.iter().map(|s| s.to_string()).collect()),
                    })
                    .collect()
            }),
        }
    }

    fn pod(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_operator_matches_as_kubernetes_does() {
        let s = Selector::try_from(&sel(
            &[("app", "a")],
            &[
                ("tier", "In", Some(&["x", "y"])),
                ("env", "NotIn", Some(&["prod"])),
                ("team", "Exists", None),
                ("debug", "DoesNotExist", None),
            ],
        ))
        .unwrap();
        assert!(s.matches(&pod(&[("app", "a"), ("tier", "x"), ("team", "t")])));
        assert!(s.matches(&pod(&[("app", "a"), ("tier", "y"), ("team", "t"), ("env", "dev")])));
        assert!(
            !s.matches(&pod(&[("app", "b"), ("tier", "x"), ("team", "t")])),
            "matchLabels"
        );
        assert!(!s.matches(&pod(&[("app", "a"), ("tier", "z"), ("team", "t")])), "In");
        assert!(!s.matches(&pod(&[("app", "a"), ("team", "t")])), "In needs the key");
        assert!(
            !s.matches(&pod(&[("app", "a"), ("tier", "x"), ("team", "t"), ("env", "prod")])),
            "NotIn"
        );
        assert!(!s.matches(&pod(&[("app", "a"), ("tier", "x")])), "Exists");
        assert!(
            !s.matches(&pod(&[("app", "a"), ("tier", "x"), ("team", "t"), ("debug", "1")])),
            "DoesNotExist"
        );
        assert_eq!(s.to_string(), "app=a,tier in (x,y),env notin (prod),team,!debug");
    }

    #[test]
    fn empty_and_malformed_selectors() {
        assert!(Selector::try_from(&LabelSelector::default()).unwrap().selects_all());
        assert!(!Selector::try_from(&sel(&[("a", "b")], &[])).unwrap().selects_all());
        // Requirements of absence only select nearly every pod.
        for (op, values) in [("NotIn", Some(&["x"][..])), ("DoesNotExist", None)] {
            let s = Selector::try_from(&sel(&[], &[("k", op, values)])).unwrap();
            assert!(!s.selects_all() && s.selects_by_absence(), "{op}");
        }
        for (op, values) in [("In", Some(&["x"][..])), ("Exists", None)] {
            let s = Selector::try_from(&sel(&[], &[("j", "NotIn", Some(&["y"])), ("k", op, values)])).unwrap();
            assert!(!s.selects_by_absence(), "{op}");
        }
        assert_eq!(
            Selector::try_from(&sel(&[], &[("k", "Matches", Some(&["v"]))])),
            Err(SelectorError::UnknownOperator {
                key: "k".into(),
                operator: "Matches".into()
            })
        );
        assert_eq!(
            Selector::try_from(&sel(&[], &[("k", "In", None)])),
            Err(SelectorError::MissingValues {
                key: "k".into(),
                operator: "In"
            })
        );
    }
}
