//! SPIFFE IDs of agents (no Kubernetes here).
//!
//! An agent's ID is bound to its namespace: it is always under
//! `spiffe://<trust domain>/ns/<namespace>/`, so a tenant can never template
//! an ID in another namespace, or one under `/mandate/` (Mandate's own, e.g.
//! the operator's `spiffe://<td>/mandate/operator`). And an ID names one
//! identity: where two identities resolve to the same ID, neither gets it.

/// The template used when an AgentIdentity names none.
pub const DEFAULT_TEMPLATE: &str = "spiffe://{trustDomain}/ns/{namespace}/agent/{name}";

/// Why a SPIFFE ID could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("trust domain '{0}' is not valid: use lowercase letters, digits, '.', '-' and '_'")]
    BadTrustDomain(String),
    #[error("template '{0}' has an unknown placeholder; use {{trustDomain}}, {{namespace}} and {{name}}")]
    UnknownPlaceholder(String),
    #[error("'{id}' is not a valid SPIFFE ID: {why}")]
    Invalid { id: String, why: &'static str },
    #[error(
        "'{id}' is outside the agent's namespace: an agent's SPIFFE ID starts with spiffe://{trust_domain}/ns/{namespace}/ (e.g. the default, spiffe://{{trustDomain}}/ns/{{namespace}}/agent/{{name}})"
    )]
    OutsideNamespace {
        id: String,
        trust_domain: String,
        namespace: String,
    },
}

/// Render `template` (or the default) for the agent `name` in `namespace`.
pub fn spiffe_id(
    template: Option<&str>,
    trust_domain: &str,
    namespace: &str,
    name: &str,
) -> Result<String, SpiffeIdError> {
    if trust_domain.is_empty()
        || !trust_domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::BadTrustDomain(trust_domain.to_string()));
    }
    let template = template.unwrap_or(DEFAULT_TEMPLATE);
    let id = template
        .replace("{trustDomain}", trust_domain)
        .replace("{namespace}", namespace)
        .replace("{name}", name);
    if id.contains('{') || id.contains('}') {
        return Err(SpiffeIdError::UnknownPlaceholder(template.to_string()));
    }
    validate(&id, trust_domain)?;
    let in_namespace = id
        .strip_prefix(&format!("spiffe://{trust_domain}/ns/{namespace}/"))
        .is_some_and(|rest| !rest.is_empty());
    if !in_namespace {
        return Err(SpiffeIdError::OutsideNamespace {
            id,
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
        });
    }
    Ok(id)
}

/// The one identity, among `(key, resolved ID)` pairs, whose ID is `id`:
/// `None` when none has it, and also when several do (an ID two identities
/// share belongs to neither).
pub fn sole_owner<K, I>(id: &str, resolved: I) -> Option<K>
where
    I: IntoIterator<Item = (K, String)>,
{
    let mut owners = resolved.into_iter().filter(|(_, r)| r == id).map(|(k, _)| k);
    let first = owners.next()?;
    owners.next().is_none().then_some(first)
}

/// The SPIFFE ID rules that matter here: scheme, our trust domain, a
/// non-empty path of non-empty segments of allowed characters.
fn validate(id: &str, trust_domain: &str) -> Result<(), SpiffeIdError> {
    let invalid = |why| SpiffeIdError::Invalid {
        id: id.to_string(),
        why,
    };
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| invalid("it must start with spiffe://"))?;
    let (td, path) = rest.split_once('/').ok_or_else(|| invalid("it has no path"))?;
    if td != trust_domain {
        return Err(invalid("its trust domain is not the cluster's"));
    }
    if path.is_empty() || path.split('/').any(str::is_empty) {
        return Err(invalid("its path has an empty segment"));
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(invalid("its path has a '.' or '..' segment"));
    }
    if !path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
    {
        return Err(invalid("its path may hold only letters, digits, '.', '-', '_' and '/'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_custom_templates() {
        assert_eq!(
            spiffe_id(None, "example.org", "team-a", "researcher").unwrap(),
            "spiffe://example.org/ns/team-a/agent/researcher"
        );
        assert_eq!(
            spiffe_id(
                Some("spiffe://{trustDomain}/ns/{namespace}/bots/{name}"),
                "example.org",
                "ns",
                "bot"
            )
            .unwrap(),
            "spiffe://example.org/ns/ns/bots/bot"
        );
    }

    #[test]
    fn an_id_is_bound_to_its_namespace_and_mandate_is_reserved() {
        // A tenant in team-b templating its way into team-a, or into Mandate's own IDs.
        for template in [
            "spiffe://{trustDomain}/ns/team-a/agent/{name}",
            "spiffe://{trustDomain}/mandate/operator",
            "spiffe://{trustDomain}/agents/{name}",
            "spiffe://{trustDomain}/ns/{namespace}",
            "spiffe://{trustDomain}/ns/{namespace}x/agent/{name}",
            "spiffe://{trustDomain}/x/ns/{namespace}/agent/{name}",
        ] {
            assert!(
                matches!(
                    spiffe_id(Some(template), "example.org", "team-b", "n"),
                    Err(SpiffeIdError::OutsideNamespace { .. })
                ),
                "{template} was accepted"
            );
        }
        // A namespace or name that would climb out is refused as a path, too.
        assert!(spiffe_id(None, "example.org", "..", "n").is_err());
        assert!(spiffe_id(None, "example.org", "ns", "a/../../mandate").is_err());
    }

    #[test]
    fn an_id_two_identities_resolve_to_belongs_to_neither() {
        let ids = |v: &[(&'static str, &str)]| v.iter().map(|(k, id)| (*k, id.to_string())).collect::<Vec<_>>();
        let id = "spiffe://td/ns/a/agent/x";
        assert_eq!(
            sole_owner(id, ids(&[("x", id), ("y", "spiffe://td/ns/a/agent/y")])),
            Some("x")
        );
        assert_eq!(sole_owner(id, ids(&[("x", id), ("shared", id)])), None);
        assert_eq!(sole_owner(id, ids(&[("y", "spiffe://td/ns/a/agent/y")])), None);
    }

    #[test]
    fn bad_templates_and_domains_are_refused() {
        assert!(matches!(
            spiffe_id(Some("spiffe://{trustDomain}/{pod}"), "example.org", "ns", "n"),
            Err(SpiffeIdError::UnknownPlaceholder(_))
        ));
        assert!(matches!(
            spiffe_id(Some("spiffe://other.org/{name}"), "example.org", "ns", "n"),
            Err(SpiffeIdError::Invalid { .. })
        ));
        assert!(matches!(
            spiffe_id(Some("https://{trustDomain}/{name}"), "example.org", "ns", "n"),
            Err(SpiffeIdError::Invalid { .. })
        ));
        assert!(matches!(
            spiffe_id(Some("spiffe://{trustDomain}//{name}"), "example.org", "ns", "n"),
            Err(SpiffeIdError::Invalid { .. })
        ));
        assert!(matches!(
            spiffe_id(None, "Example.ORG", "ns", "n"),
            Err(SpiffeIdError::BadTrustDomain(_))
        ));
    }
}
