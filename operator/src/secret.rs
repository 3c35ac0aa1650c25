//! The one way the operator keeps a Secret of its own (the webhook
//! certificate, the SPIFFE CA): read it, decide whether it will do, and
//! otherwise write a new one. Replicas racing here converge: creation and
//! replacement are conditional (on absence, on the resourceVersion read),
//! and the loser reads again and decides on what the winner wrote.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use mandate_api::names::{MANAGED_BY, MANAGED_BY_LABEL};

/// How many times a contended write is retried before giving up.
const ATTEMPTS: usize = 3;

/// A key of a Secret as UTF-8 text (PEM), if present.
pub fn text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// What a Secret should hold: its type, annotations and (text) data. Its
/// name, namespace and managed-by label are set by [`keep`].
#[derive(Debug, Clone, Default)]
pub struct Contents {
    pub type_: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub data: BTreeMap<String, String>,
}

/// What to do with the Secret as it is (`None`: absent).
#[derive(Debug)]
pub enum Decision<T> {
    /// It will do; `T` is what it holds.
    Keep(T),
    /// Write these contents; `T` is what they hold.
    Write(Contents, T),
}

/// How [`keep`] ended.
#[derive(Debug)]
pub enum Kept<T> {
    /// The Secret as it was.
    Read(T),
    /// What this replica wrote.
    Written(T),
    /// Other writers changed the Secret at every attempt.
    Contended,
}

/// Read Secret `ns/name`, let `decide` judge it, and write what it asks
/// for: create when absent, replace (conditionally) otherwise. On a
/// conflict (another replica wrote first) read again and decide again.
pub async fn keep<T, E>(
    client: &Client,
    ns: &str,
    name: &str,
    mut decide: impl FnMut(Option<&Secret>) -> Result<Decision<T>, E>,
) -> Result<Kept<T>, E>
where
    E: From<kube::Error>,
{
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for _ in 0..ATTEMPTS {
        let existing = api.get_opt(name).await?;
        let (contents, value) = match decide(existing.as_ref())? {
            Decision::Keep(value) => return Ok(Kept::Read(value)),
            Decision::Write(contents, value) => (contents, value),
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                resource_version: existing.as_ref().and_then(|s| s.metadata.resource_version.clone()),
                labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())].into()),
                annotations: Some(contents.annotations),
                ..ObjectMeta::default()
            },
            type_: contents.type_,
            data: Some(
                contents
                    .data
                    .into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Secret::default()
        };
        let written = match &existing {
            None => api.create(&PostParams::default(), &secret).await,
            Some(_) => api.replace(name, &PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => return Ok(Kept::Written(value)),
            // Another replica wrote first: decide on what it wrote.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Kept::Contended)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_reads_utf8_keys_only() {
        let s = Secret {
            data: Some(
                [
                    ("a".to_string(), ByteString(b"pem".to_vec())),
                    ("b".to_string(), ByteString(vec![0xff, 0xfe])),
                ]
                .into(),
            ),
            ..Secret::default()
        };
        assert_eq!(text(&s, "a").as_deref(), Some("pem"));
        assert_eq!(text(&s, "b"), None);
        assert_eq!(text(&s, "c"), None);
        assert_eq!(text(&Secret::default(), "a"), None);
    }
}
