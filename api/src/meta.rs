//! The few Kubernetes meta types Mandate's resources embed, as plain serde
//! structs: they serialize exactly as the apiserver's (`metav1.LabelSelector`,
//! `metav1.Condition`, `metav1.Time`), so the data plane can read a resource
//! without linking a Kubernetes client.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A label query over pods: every `matchLabels` pair and every
/// `matchExpressions` requirement must hold.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Requirements on labels, all of which must hold (ANDed with `matchLabels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
    /// Labels the pod must carry with exactly these values; each pair is one
    /// requirement, ANDed with the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
}

/// One requirement of a label selector: a key, an operator and values.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct LabelSelectorRequirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// The values for `In` and `NotIn` (at least one); none for `Exists` and
    /// `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

/// A point in time, in RFC 3339 at second precision (`2026-01-02T03:04:05Z`),
/// as the apiserver writes `metav1.Time`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub jiff::Timestamp);

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let s = jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", self.0).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&s)
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse::<jiff::Timestamp>()
            .map(Time)
            .map_err(|e| serde::de::Error::custom(format!("'{s}' is not an RFC 3339 time: {e}")))
    }
}

impl JsonSchema for Time {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Time".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A time in RFC 3339 form, at second precision.",
            "type": "string",
            "format": "date-time",
        })
    }
}

/// One aspect of an object's state, as `kubectl wait --for=condition=` reads it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// When `status` last changed.
    pub last_transition_time: Time,
    /// A human-readable account of the state.
    pub message: String,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// A CamelCase word saying why, for machines.
    pub reason: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// The aspect, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times_serialize_as_the_apiserver_writes_them() {
        let t: Time = serde_json::from_str("\"2026-01-02T03:04:05.678Z\"").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"2026-01-02T03:04:05Z\"");
        assert!(serde_json::from_str::<Time>("\"yesterday\"").is_err());
    }

    #[test]
    fn a_condition_reads_and_writes_its_type_field() {
        let json = serde_json::json!({
            "lastTransitionTime": "2026-01-02T03:04:05Z", "message": "m",
            "reason": "R", "status": "True", "type": "Ready"
        });
        let c: Condition = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(c.type_, "Ready");
        assert_eq!(serde_json::to_value(&c).unwrap(), json);
    }
}
