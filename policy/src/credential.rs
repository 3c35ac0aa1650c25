//! Brokered credentials: a value the sidecar adds to allowed requests to
//! one egress destination, so that the agent never holds it.
//!
//! Two halves meet here. A policy's spec *declares* a credential on an
//! egress destination ([`Declaration`], from `EgressDestination.credential`):
//! where it goes (a header or a query parameter), its prefix, and what
//! happens to a value the agent sends itself. The operator *supplies* the
//! value on the policy stream ([`Credential`]), or says why it has none.
//! A destination that declares a credential with no value for it is known
//! (so requests to it are denied with the reason, never sent without).
//!
//! The value lives in a [`SecretValue`], which prints, formats and
//! serializes as `[redacted]`, and is wiped from memory when dropped.

use mandate_api::crd::{AgentSupplied, EgressDestination};
use zeroize::Zeroizing;

use crate::engine::{host_matches, normalize_host};

/// What a [`SecretValue`] shows instead of itself.
pub const REDACTED: &str = "[redacted]";

/// A credential's value. `Debug`, `Display` and `Serialize` show
/// [`REDACTED`]; only [`SecretValue::expose`] gives the bytes, for the one
/// place that puts them into an allowed request.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The bytes. Never log, trace or record them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl std::fmt::Display for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl serde::Serialize for SecretValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// Where a credential goes in the request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// A request header (lower case).
    Header(String),
    /// A query parameter (case sensitive).
    QueryParameter(String),
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(h) => write!(f, "header {h:?}"),
            Self::QueryParameter(q) => write!(f, "query parameter {q:?}"),
        }
    }
}

/// A destination a policy's `egress` declares with a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    /// The declaring policy ([`crate::engine::LoadedPolicy::name`]).
    pub policy: String,
    /// The host pattern (exact, or `*.suffix`), normalized.
    pub host: String,
    pub port: u16,
    pub placement: Placement,
    /// Written before the value.
    pub prefix: String,
    /// Deny a request carrying a value of the agent's own (else drop it).
    pub deny_agent_supplied: bool,
}

impl Declaration {
    /// The declaration `dest` makes in policy `policy`, if it brokers a credential.
    pub fn from_spec(policy: &str, dest: &EgressDestination) -> Option<Self> {
        let c = dest.credential.as_ref()?;
        let placement = match (c.header_name(), &c.query_parameter) {
            (Some(h), _) => Placement::Header(h),
            (None, Some(q)) => Placement::QueryParameter(q.clone()),
            // header_name() is None only for a query parameter.
            (None, None) => Placement::Header("authorization".into()),
        };
        Some(Self {
            policy: policy.to_string(),
            host: normalize_host(&dest.host),
            port: dest.port,
            placement,
            prefix: c.value_prefix(),
            deny_agent_supplied: c.agent_supplied == AgentSupplied::Deny,
        })
    }

    /// Whether a request to the normalized `host` on `port` is to this destination.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.port == port && host_matches(&self.host, host)
    }

    /// Whether `c` is the operator's value for this declaration (the same
    /// policy and destination).
    fn is_for(&self, c: &Credential) -> bool {
        c.policy == self.policy && c.host == self.host && c.port == self.port
    }

    /// Why `c` (for this declaration) cannot be used as it is: it puts the
    /// value elsewhere, or treats the agent's own otherwise, than the
    /// policy's spec says. The spec (compiled and versioned here) wins.
    fn disagreement(&self, c: &Credential) -> Option<String> {
        // Under a wildcard the agent picks the name, and a name under a
        // shared suffix can be another tenant's: never broker there (the
        // CRD refuses it; this holds for objects written around it).
        if self.host.starts_with("*.") {
            return Some(format!(
                "a brokered credential needs an exact host, not {}: under a wildcard the agent chooses the name it goes to",
                self.host
            ));
        }
        let what = if c.placement != self.placement {
            format!("the {}, where the policy declares the {}", c.placement, self.placement)
        } else if c.prefix != self.prefix {
            "another prefix than the policy declares".to_string()
        } else if c.deny_agent_supplied != self.deny_agent_supplied {
            "another agentSupplied than the policy declares".to_string()
        } else {
            return None;
        };
        Some(format!(
            "the operator's credential for {}:{} (policy {}) names {what}, so it is not used",
            self.host, self.port, self.policy
        ))
    }
}

/// A brokered credential as the operator supplies it, for one destination
/// of one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// `namespace/name` of the declaring policy.
    pub policy: String,
    /// The destination's host pattern, normalized, and port.
    pub host: String,
    pub port: u16,
    pub placement: Placement,
    pub prefix: String,
    pub deny_agent_supplied: bool,
    /// The value, or why there is none (a deny, with this reason, for
    /// every request to the destination).
    pub value: Result<SecretValue, String>,
    /// Where it comes from, for the decision log (never the value).
    pub source: String,
    /// Changes whenever the value does; never derived from it.
    pub version: String,
    /// When the value stops being valid (Unix seconds; 0: not known).
    pub expires_unix: i64,
}

impl Credential {
    /// The credential with its placement and value checked: a header name
    /// must be a lower-case token Mandate does not reserve, a query
    /// parameter's name needs no escaping, and a value (with its prefix)
    /// sent in a header must be text without control characters. What
    /// fails makes the value unavailable, with the reason.
    pub fn checked(mut self) -> Self {
        if let Err(why) = self.check() {
            self.value = Err(format!(
                "the credential for {}:{} (policy {}, {}) cannot be used: {why}",
                self.host, self.port, self.policy, self.source
            ));
        }
        self
    }

    fn check(&self) -> Result<(), String> {
        let Ok(value) = &self.value else {
            return Ok(());
        };
        if value.is_empty() {
            return Err("its value is empty".into());
        }
        match &self.placement {
            Placement::Header(name) => {
                check_header_name(name)?;
                check_header_text("prefix", self.prefix.as_bytes())?;
                check_header_text("value", value.expose())?;
            }
            Placement::QueryParameter(name) => check_query_name(name)?,
        }
        Ok(())
    }

    /// The value with its prefix, if there is one and it has not expired at `now_unix`.
    pub fn value_at(&self, now_unix: i64) -> Result<&SecretValue, String> {
        let value = self.value.as_ref().map_err(Clone::clone)?;
        if self.expires_unix > 0 && now_unix >= self.expires_unix {
            return Err(format!(
                "the credential for {}:{} ({}, version {}) expired at {} (Unix time) and no renewed one has arrived",
                self.host, self.port, self.source, self.version, self.expires_unix
            ));
        }
        Ok(value)
    }
}

/// Headers a credential may not go into: what frames or routes the request
/// (Envoy, or the upstream, would read it as such), and the headers Envoy
/// and Mandate act on.
fn reserved_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "content-type"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
    ) || name.starts_with("x-envoy-")
        || name.starts_with("x-mandate-")
}

fn check_header_name(name: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("the header name {name:?} is not a lower-case HTTP token"));
    }
    if reserved_header(name) {
        return Err(format!(
            "the header {name:?} frames or steers the request and cannot carry a credential"
        ));
    }
    Ok(())
}

fn check_query_name(name: &str) -> Result<(), String> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    if name.is_empty() || !name.bytes().all(unreserved) {
        return Err(format!(
            "the query parameter name {name:?} has characters that need escaping (use letters, digits and -._~)"
        ));
    }
    Ok(())
}

/// Header text: UTF-8, no control characters but tab (CR, LF or NUL would
/// split or cut the request; a trailing newline, as `echo` writes into a
/// file, counts).
fn check_header_text(what: &str, bytes: &[u8]) -> Result<(), String> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(format!("its {what} is not UTF-8 text, as a header value must be"));
    }
    if let Some(b) = bytes.iter().find(|b| b.is_ascii_control() && **b != b'\t') {
        return Err(format!(
            "its {what} holds the control character 0x{b:02x} (CR, LF and NUL cannot be sent in a header; a trailing newline counts)"
        ));
    }
    Ok(())
}

/// What a request to a destination that declares a credential gets: the
/// declaration that applies, and the operator's value for it or why there
/// is none.
#[derive(Debug, Clone)]
pub struct Brokered<'a> {
    pub declaration: &'a Declaration,
    pub credential: Result<&'a Credential, String>,
}

impl Brokered<'_> {
    /// The credential's source and version, for the decision log.
    pub fn source(&self) -> Option<(&str, &str)> {
        self.credential
            .as_ref()
            .ok()
            .map(|c| (c.source.as_str(), c.version.as_str()))
    }
}

/// The credential brokered for requests to the normalized `host` on `port`,
/// given every declaration in force and the credentials supplied (`None`:
/// no destination that matches declares one). `no_value` says why a
/// declaration has no credential at all. Several declarations may match
/// (a wildcard and an exact host, or two policies): they must agree on
/// placement and value, or none is sent.
pub fn resolve<'a>(
    declarations: impl Iterator<Item = &'a Declaration>,
    credentials: &'a [Credential],
    host: &str,
    port: u16,
    no_value: &str,
) -> Option<Brokered<'a>> {
    let matching: Vec<&Declaration> = declarations.filter(|d| d.matches(host, port)).collect();
    let first = *matching.first()?;
    let lookup = |d: &'a Declaration| -> Result<&'a Credential, String> {
        let c = credentials.iter().find(|c| d.is_for(c)).ok_or_else(|| {
            format!(
                "policy {} brokers a credential for {}:{}, but {no_value}",
                d.policy, d.host, d.port
            )
        })?;
        if let Err(why) = &c.value {
            return Err(why.clone());
        }
        match d.disagreement(c) {
            Some(why) => Err(why),
            None => Ok(c),
        }
    };
    let chosen = lookup(first);
    for other in matching.iter().skip(1) {
        let agree = match (&chosen, lookup(other)) {
            (Ok(a), Ok(b)) => a.placement == b.placement && a.prefix == b.prefix && a.value == b.value,
            (Err(_), _) => true, // denied anyway, with the first one's reason
            (Ok(_), Err(_)) => false,
        };
        if !agree || other.deny_agent_supplied != first.deny_agent_supplied {
            let names: Vec<&str> = matching.iter().map(|d| d.policy.as_str()).collect();
            return Some(Brokered {
                declaration: first,
                credential: Err(format!(
                    "{} declarations ({}) broker differing credentials for {host}:{port}, so none is sent",
                    matching.len(),
                    names.join(", ")
                )),
            });
        }
    }
    Some(Brokered {
        declaration: first,
        credential: chosen,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    fn cred(value: &[u8]) -> Credential {
        Credential {
            policy: "ns/p".into(),
            host: "api.example.com".into(),
            port: 443,
            placement: Placement::Header("authorization".into()),
            prefix: "Bearer ".into(),
            deny_agent_supplied: false,
            value: Ok(SecretValue::new(value.to_vec())),
            source: "secret ns/s key token".into(),
            version: "7".into(),
            expires_unix: 0,
        }
    }

    fn decl() -> Declaration {
        Declaration {
            policy: "ns/p".into(),
            host: "api.example.com".into(),
            port: 443,
            placement: Placement::Header("authorization".into()),
            prefix: "Bearer ".into(),
            deny_agent_supplied: false,
        }
    }

    #[test]
    fn the_value_never_prints() {
        let c = cred(b"s3cr3t-token");
        for shown in [
            format!("{c:?}"),
            format!("{:?}", c.value),
            format!("{}", c.value.as_ref().unwrap()),
            serde_json::to_string(c.value.as_ref().unwrap()).unwrap(),
            format!(
                "{:#?}",
                Brokered {
                    declaration: &decl(),
                    credential: Ok(&c)
                }
            ),
        ] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
        assert!(format!("{c:?}").contains(REDACTED));
        assert_eq!(c.value.as_ref().unwrap().expose(), b"s3cr3t-token");
    }

    #[test]
    fn invalid_values_and_names_make_the_credential_unavailable() {
        assert!(cred(b"fine token").checked().value.is_ok());
        for (bad, why) in [
            (&b"token\n"[..], "0x0a"),
            (b"to\r\nx-evil: 1", "0x0d"),
            (b"tok\0en", "0x00"),
            (b"\xff\xfe", "UTF-8"),
            (b"", "empty"),
        ] {
            let c = cred(bad).checked();
            let err = c.value.unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains("secret ns/s key token"), "{err}");
        }
        for name in [
            "Authorization",
            "x api",
            "",
            "host",
            "x-mandate-upstream-tls",
            "x-envoy-retry-on",
            "content-length",
        ] {
            let mut c = cred(b"t");
            c.placement = Placement::Header(name.into());
            assert!(c.checked().value.is_err(), "{name}");
        }
        let mut c = cred(b"t");
        c.prefix = "Bearer\n".into();
        assert!(c.checked().value.is_err());
        for (name, ok) in [
            ("api_key", true),
            ("key-1.x~", true),
            ("a b", false),
            ("a&b", false),
            ("k=", false),
            ("", false),
        ] {
            let mut c = cred(b"any \n bytes: escaped in a query");
            c.placement = Placement::QueryParameter(name.into());
            assert_eq!(c.checked().value.is_ok(), ok, "{name}");
        }
    }

    #[test]
    fn expiry_is_checked_at_use() {
        let mut c = cred(b"t");
        c.expires_unix = 1000;
        assert!(c.value_at(999).is_ok());
        let err = c.value_at(1000).unwrap_err();
        assert!(err.contains("expired"), "{err}");
        c.expires_unix = 0;
        assert!(c.value_at(i64::MAX).is_ok());
    }

    #[test]
    fn a_wildcard_destination_never_brokers() {
        let mut d = decl();
        d.host = "*.example.com".into();
        let mut c = cred(b"t");
        c.host = "*.example.com".into();
        // A name the agent chose under the wildcard: recognised as brokered,
        // and denied rather than sent.
        let r = resolve(
            [&d].into_iter(),
            std::slice::from_ref(&c),
            "tenant.example.com",
            443,
            "none",
        )
        .unwrap();
        assert!(r.credential.unwrap_err().contains("needs an exact host"));
    }

    #[test]
    fn resolution_matches_host_and_port_and_wants_agreement() {
        let d = decl();
        let creds = vec![cred(b"t")];
        let none = "no value";
        let r = resolve([&d].into_iter(), &creds, "api.example.com", 443, none).unwrap();
        assert!(r.credential.is_ok());
        assert_eq!(r.source(), Some(("secret ns/s key token", "7")));
        assert!(resolve([&d].into_iter(), &creds, "api.example.com", 8443, none).is_none());
        assert!(resolve([&d].into_iter(), &creds, "x.api.example.com", 443, none).is_none());
        // Declared, with no value: known, with the reason.
        let r = resolve(
            [&d].into_iter(),
            &[],
            "api.example.com",
            443,
            "policies loaded from files carry none",
        )
        .unwrap();
        assert!(r.credential.unwrap_err().contains("files carry none"));
        // A value for another placement than the spec declares: not used.
        let mut moved = cred(b"t");
        moved.placement = Placement::QueryParameter("key".into());
        let r = resolve(
            [&d].into_iter(),
            std::slice::from_ref(&moved),
            "api.example.com",
            443,
            none,
        )
        .unwrap();
        assert!(r.credential.unwrap_err().contains("not used"));
        // Unavailable: its reason.
        let mut gone = cred(b"t");
        gone.value = Err("Secret ns/s not found".into());
        let r = resolve(
            [&d].into_iter(),
            std::slice::from_ref(&gone),
            "api.example.com",
            443,
            none,
        )
        .unwrap();
        assert_eq!(r.credential.unwrap_err(), "Secret ns/s not found");
        // Another policy on the same host with another value: ambiguous.
        let mut second = decl();
        second.policy = "ns/q".into();
        let mut other = cred(b"other");
        other.policy = "ns/q".into();
        let both = vec![cred(b"t"), other.clone()];
        let r = resolve([&d, &second].into_iter(), &both, "api.example.com", 443, none).unwrap();
        assert!(r.credential.unwrap_err().contains("differing"), "ambiguous");
        // A wildcard beside it never brokers, even for the exact host.
        let mut wild = decl();
        wild.policy = "ns/w".into();
        wild.host = "*.example.com".into();
        let mut w = cred(b"t");
        w.policy = "ns/w".into();
        w.host = "*.example.com".into();
        let with_wild = vec![cred(b"t"), w];
        let r = resolve([&wild].into_iter(), &with_wild, "b.example.com", 443, none).unwrap();
        assert!(r.credential.unwrap_err().contains("needs an exact host"));
        // The same value from both exact declarations: sent.
        other.value = Ok(SecretValue::new(b"t".to_vec()));
        let same = vec![cred(b"t"), other];
        let r = resolve([&d, &second].into_iter(), &same, "api.example.com", 443, none).unwrap();
        assert!(r.credential.is_ok());
    }
}
