//! SPIFFE IDs of agents (no Kubernetes here).

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
    Ok(id)
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
            spiffe_id(Some("spiffe://{trustDomain}/agents/{name}"), "example.org", "ns", "bot").unwrap(),
            "spiffe://example.org/agents/bot"
        );
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
