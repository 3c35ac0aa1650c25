//! Objects that may not parse. A custom resource the apiserver accepted can
//! still fail to deserialize into our types (an older or newer schema, a
//! status someone else wrote). Watched as [`Lenient`], such an object is one
//! reconcile that logs and reports it, not a list that fails for every other
//! object of its kind; and when only its status is unreadable, it is read
//! without it, so that the reconcile writes a good one.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

/// An object of kind `K` as the apiserver sent it: its metadata, and either
/// the typed object or why it is not one.
#[derive(Clone, Debug)]
pub struct Lenient<K> {
    pub metadata: ObjectMeta,
    pub parsed: Result<K, String>,
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let metadata = match value.get("metadata") {
            Some(m) => ObjectMeta::deserialize(m).map_err(D::Error::custom)?,
            None => ObjectMeta::default(),
        };
        let parsed = match K::deserialize(&value) {
            Ok(k) => Ok(k),
            // A status we cannot read is ours to rewrite: read the object
            // without it, and the reconcile writes a fresh one.
            Err(full) => {
                let mut without_status = value;
                let had_status = without_status
                    .as_object_mut()
                    .and_then(|o| o.remove("status"))
                    .is_some();
                match K::deserialize(without_status) {
                    Ok(k) if had_status => {
                        tracing::warn!(error = %full, "unreadable status dropped; it will be rewritten");
                        Ok(k)
                    }
                    _ => Err(full.to_string()),
                }
            }
        };
        Ok(Self { metadata, parsed })
    }
}

/// What a cache never reads, dropped before an object is stored: its
/// managed fields (often the largest part of it) and kubectl's
/// last-applied-configuration annotation (a second copy of the whole object).
/// With thousands of objects, in several caches, this is most of the memory.
pub fn slim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

impl<K: Resource> Lenient<K> {
    /// [`slim_meta`] on both copies of the metadata.
    pub fn slim(&mut self) {
        slim_meta(&mut self.metadata);
        if let Ok(k) = self.parsed.as_mut() {
            slim_meta(k.meta_mut());
        }
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_api::crd::AgentIdentity;

    #[test]
    fn an_unreadable_status_is_dropped_so_it_can_be_rewritten() {
        let bad_status = serde_json::json!({
            "apiVersion": "mandate.dev/v1alpha1", "kind": "AgentIdentity",
            "metadata": {"name": "x", "namespace": "ns"},
            "spec": {"selector": {}},
            "status": {"boundPods": 99_999_999_999_i64},
        });
        let l: Lenient<AgentIdentity> = serde_json::from_value(bad_status).unwrap();
        let parsed = l.parsed.unwrap();
        assert!(parsed.status.is_none());
    }

    #[test]
    fn an_object_that_does_not_parse_keeps_its_metadata_and_the_reason() {
        let bad = serde_json::json!({
            "apiVersion": "mandate.dev/v1alpha1", "kind": "AgentIdentity",
            "metadata": {"name": "x", "namespace": "ns"},
            "spec": {"selector": {}, "mayInvoke": 7},
        });
        let l: Lenient<AgentIdentity> = serde_json::from_value(bad).unwrap();
        assert_eq!(l.metadata.name.as_deref(), Some("x"));
        let err = l.parsed.unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
        let good = serde_json::json!({
            "apiVersion": "mandate.dev/v1alpha1", "kind": "AgentIdentity",
            "metadata": {"name": "y"}, "spec": {"selector": {}},
        });
        let l: Lenient<AgentIdentity> = serde_json::from_value(good).unwrap();
        assert!(l.parsed.is_ok());
    }
}
