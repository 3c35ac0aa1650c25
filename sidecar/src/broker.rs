//! Brokered credentials on the data plane: after a request to a
//! destination that brokers one is allowed, the sidecar puts the
//! credential into the OK response, for Envoy to add to the request on its
//! way upstream. The agent never holds it: not in its environment, not in
//! a response, not in an error. It is added only
//! - to an allowed request (a denied one never gets it: it is only ever
//!   written into the OK response);
//! - whose upstream leg is TLS: inside intercepted TLS, or on a path where
//!   Envoy originates TLS (`tls: true`). Plain HTTP would hand it to the
//!   network, so that request is denied;
//! - after the agent's own value is removed (`agentSupplied: Drop`) or the
//!   request is denied for carrying one (`Deny`): the credential's header
//!   or query parameter, and any `Authorization` header.
//!
//! The decision log says which credential (source, version) and whether
//! it was added, never its value.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, QueryParameter};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::OkHttpResponse;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use mandate_policy::credential::{Brokered, Placement};
use mandate_policy::engine::PolicySet;

use crate::egress::{CONNECT_AUTHORITY_HEADER, EgressPath};

/// Where a request goes, as far as a credential is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host, normalized.
    pub host: String,
    pub port: u16,
    /// Whether the upstream leg is TLS.
    pub tls: bool,
}

/// The destination of an HTTP request (not a CONNECT, not a connection's
/// check), on the paths that carry requests:
/// - inside intercepted TLS: the request's host, on the port of the CONNECT
///   that opened the TLS (Envoy's header; 443 when it has none), and TLS;
/// - the explicit proxy and transparent HTTP: the Host header's host and
///   port; TLS when Envoy originates it to the host (`tls: true`, which is
///   what routes the request to the TLS upstream), with 443 as the default
///   port then (what Envoy connects to), else the scheme's.
///
/// `None`: not a request a credential could go into.
pub fn target(path: EgressPath, http: &HttpRequest, set: &PolicySet) -> Option<Target> {
    if http.method.eq_ignore_ascii_case("CONNECT") {
        return None;
    }
    match path {
        EgressPath::Intercept => {
            let (host, _) = crate::input::parse_host(&http.host, "https", &http.method).ok()?;
            let port = match http.headers.get(CONNECT_AUTHORITY_HEADER) {
                Some(a) => a.rsplit_once(':')?.1.parse::<u16>().ok()?,
                None => 443,
            };
            Some(Target { host, port, tls: true })
        }
        EgressPath::Proxy | EgressPath::TransparentHttp => {
            let tls = set.originates_tls(&http.host);
            let scheme = if tls { "https" } else { http.scheme.as_str() };
            let (host, port) = crate::input::parse_host(&http.host, scheme, &http.method).ok()?;
            Some(Target { host, port, tls })
        }
        EgressPath::Sni | EgressPath::Raw => None,
    }
}

/// Why a credential was not added to an allowed request (a deny), with
/// the metric's label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub result: &'static str,
    pub reason: String,
}

/// What goes into the OK response: the credential, and the removal of the
/// agent's own values.
#[derive(Debug, Default)]
pub struct Injection {
    headers: Vec<HeaderValueOption>,
    headers_to_remove: Vec<String>,
    query_set: Vec<QueryParameter>,
    query_remove: Vec<String>,
    /// The header the credential goes into (policy headers of that name are dropped).
    header: Option<String>,
}

impl Injection {
    /// Put it into an allowed request's response.
    pub fn apply(self, ok: &mut OkHttpResponse) {
        if let Some(h) = &self.header {
            // Nothing else writes the credential's header.
            ok.headers
                .retain(|o| o.header.as_ref().is_none_or(|v| !v.key.eq_ignore_ascii_case(h)));
        }
        ok.headers.extend(self.headers);
        ok.headers_to_remove.extend(self.headers_to_remove);
        ok.query_parameters_to_set.extend(self.query_set);
        ok.query_parameters_to_remove.extend(self.query_remove);
    }
}

/// Header names the same to servers that read `_` as `-` (CGI, WSGI).
fn same_header(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| x.eq_ignore_ascii_case(&y) || (b"-_".contains(&x) && b"-_".contains(&y)))
}

/// The agent's own values where the credential goes: headers (by name as
/// sent), and query parameters (raw keys Envoy can remove; `Err` when one
/// hides where Envoy cannot remove it, behind a `;`).
struct AgentSupplied {
    headers: Vec<String>,
    query_keys: Vec<String>,
    hidden: Option<String>,
}

fn agent_supplied(placement: &Placement, http: &HttpRequest) -> AgentSupplied {
    let mut out = AgentSupplied {
        headers: http
            .headers
            .keys()
            .filter(|k| {
                same_header(k, "authorization") || matches!(placement, Placement::Header(h) if same_header(k, h))
            })
            .cloned()
            .collect(),
        query_keys: vec![],
        hidden: None,
    };
    if let Placement::QueryParameter(name) = placement {
        let query = http.path.split_once('?').map_or("", |(_, q)| q);
        let query = query.split_once('#').map_or(query, |(q, _)| q);
        for pair in query.split('&') {
            // Envoy's unit is the `&`-separated pair; some servers also
            // split on `;`, where Envoy would not remove what follows.
            for (i, part) in pair.split(';').enumerate() {
                let raw = part.split_once('=').map_or(part, |(k, _)| k);
                if crate::input::unescape(raw, true).as_deref() == Some(name.as_str()) {
                    if i == 0 {
                        out.query_keys.push(raw.to_string());
                    } else {
                        out.hidden = Some(raw.to_string());
                    }
                }
            }
        }
    }
    out
}

/// Percent-encode everything but unreserved characters: Envoy writes query
/// parameters as given.
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What an allowed request to `target` gets from `brokered` at `now_unix`:
/// the injection, or the reason it is denied instead.
pub fn inject(
    brokered: &Brokered<'_>,
    target: &Target,
    http: &HttpRequest,
    now_unix: i64,
) -> Result<Injection, Refusal> {
    let decl = brokered.declaration;
    let dest = format!("{}:{}", target.host, target.port);
    if !target.tls {
        return Err(Refusal {
            result: "not_tls",
            reason: format!(
                "a brokered credential is sent only over TLS; this request to {dest} would reach its upstream in plain HTTP (use https, or declare the destination `tls: true` so that Envoy originates TLS)"
            ),
        });
    }
    // TRACE (and TRACK) echo the request, its headers included, back to
    // the client: the credential would come back to the agent.
    if http.method.eq_ignore_ascii_case("TRACE") || http.method.eq_ignore_ascii_case("TRACK") {
        return Err(Refusal {
            result: "reflecting_method",
            reason: format!(
                "{} echoes the request back to the agent, so it is never sent to {dest}, where Mandate brokers the credential",
                http.method
            ),
        });
    }
    let credential = brokered.credential.as_ref().map_err(|why| Refusal {
        result: "unavailable",
        reason: format!("the credential Mandate brokers for {dest} is unavailable: {why}"),
    })?;
    let value = credential.value_at(now_unix).map_err(|why| Refusal {
        result: "unavailable",
        reason: format!("the credential Mandate brokers for {dest} is unavailable: {why}"),
    })?;
    let own = agent_supplied(&decl.placement, http);
    let mut sent: Vec<String> = own.headers.iter().map(|h| format!("header {h:?}")).collect();
    sent.extend(own.query_keys.iter().map(|q| format!("query parameter {q:?}")));
    if let Some(hidden) = &own.hidden {
        return Err(Refusal {
            result: "agent_supplied_denied",
            reason: format!(
                "the request carries its own {} (as {hidden:?}, after a ';') to {dest}, where Mandate brokers the credential, and it cannot be removed",
                decl.placement
            ),
        });
    }
    if decl.deny_agent_supplied && !sent.is_empty() {
        return Err(Refusal {
            result: "agent_supplied_denied",
            reason: format!(
                "the request carries its own {} to {dest}, where Mandate brokers the credential (agentSupplied: Deny)",
                sent.join(", ")
            ),
        });
    }
    let mut with_prefix = decl.prefix.as_bytes().to_vec();
    with_prefix.extend_from_slice(value.expose());
    let mut out = Injection::default();
    match &decl.placement {
        Placement::Header(name) => {
            // Checked as text when the set was built.
            let text = String::from_utf8(with_prefix).map_err(|_| Refusal {
                result: "unavailable",
                reason: format!("the credential Mandate brokers for {dest} is not text"),
            })?;
            out.headers.push(HeaderValueOption {
                header: Some(HeaderValue {
                    key: name.clone(),
                    value: text,
                    ..HeaderValue::default()
                }),
                // Every value the agent sent under this name is replaced.
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..HeaderValueOption::default()
            });
            // Envoy removes after it sets: the credential's own header is
            // overwritten, never listed here.
            out.headers_to_remove = own.headers.into_iter().filter(|h| h != name).collect();
            out.header = Some(name.clone());
        }
        Placement::QueryParameter(name) => {
            out.query_set.push(QueryParameter {
                key: name.clone(),
                value: percent_encode(&with_prefix),
            });
            // Envoy removes after it sets: other spellings only.
            out.query_remove = own.query_keys.into_iter().filter(|k| k != name).collect();
            out.headers_to_remove = own.headers;
        }
    }
    Ok(out)
}

/// The credential's part of the decision log record: where it comes from
/// and whether it was added, never its value.
pub fn record(brokered: &Brokered<'_>, injected: bool) -> serde_json::Value {
    let (source, version) = brokered.source().unwrap_or(("", ""));
    let mut m = serde_json::Map::new();
    m.insert("policy".into(), brokered.declaration.policy.clone().into());
    if !source.is_empty() {
        m.insert("source".into(), source.into());
        m.insert("version".into(), version.into());
    }
    m.insert("injected".into(), injected.into());
    serde_json::Value::Object(m)
}

/// `input.credential` for a request to a destination that brokers one:
/// that it does, from where, and whether a value is there (never the value).
pub fn input_value(brokered: &Brokered<'_>) -> regorus::Value {
    let mut m = regorus::value::Object::new();
    m.insert(regorus::Value::from("brokered"), regorus::Value::Bool(true));
    m.insert(
        regorus::Value::from("available"),
        regorus::Value::Bool(brokered.credential.is_ok()),
    );
    m.insert(
        regorus::Value::from("policy"),
        regorus::Value::from(brokered.declaration.policy.as_str()),
    );
    if let Some((source, version)) = brokered.source() {
        m.insert(regorus::Value::from("source"), regorus::Value::from(source));
        m.insert(regorus::Value::from("version"), regorus::Value::from(version));
    }
    m.into()
}

/// The headers of a request as the decision log may show them, with the
/// credential's header redacted too (the agent's value there may be a
/// credential it should not hold).
pub fn redact_header(headers: &mut BTreeMap<String, String>, brokered: &Brokered<'_>) {
    if let Placement::Header(name) = &brokered.declaration.placement {
        for (k, v) in headers.iter_mut() {
            if same_header(k, name) {
                *v = "[REDACTED]".into();
            }
        }
    }
}

/// The HTTP request of a check, if it has one.
pub fn http(req: &CheckRequest) -> Option<&HttpRequest> {
    req.attributes.as_ref()?.request.as_ref()?.http.as_ref()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use mandate_policy::credential::{Credential, Declaration, SecretValue};

    const SECRET: &[u8] = b"s3cr3t-value";

    fn decl(placement: Placement, deny: bool) -> Declaration {
        Declaration {
            policy: "ns/p".into(),
            host: "api.example.com".into(),
            port: 443,
            prefix: if matches!(&placement, Placement::Header(h) if h == "authorization") {
                "Bearer ".into()
            } else {
                String::new()
            },
            placement,
            deny_agent_supplied: deny,
        }
    }

    fn cred(d: &Declaration) -> Credential {
        Credential {
            policy: d.policy.clone(),
            host: d.host.clone(),
            port: d.port,
            placement: d.placement.clone(),
            prefix: d.prefix.clone(),
            deny_agent_supplied: d.deny_agent_supplied,
            value: Ok(SecretValue::new(SECRET.to_vec())),
            source: "secret ns/s key token".into(),
            version: "42".into(),
            expires_unix: 0,
        }
    }

    fn req(path: &str, headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            host: "api.example.com".into(),
            path: path.into(),
            scheme: "https".into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..HttpRequest::default()
        }
    }

    fn tls() -> Target {
        Target {
            host: "api.example.com".into(),
            port: 443,
            tls: true,
        }
    }

    fn applied(i: Injection) -> OkHttpResponse {
        let mut ok = OkHttpResponse::default();
        i.apply(&mut ok);
        ok
    }

    #[test]
    fn a_header_credential_overwrites_and_the_agents_authorization_goes() {
        let d = decl(Placement::Header("x-api-key".into()), false);
        let c = cred(&d);
        let b = Brokered {
            declaration: &d,
            credential: Ok(&c),
        };
        let r = req(
            "/v1",
            &[
                ("authorization", "Bearer stolen"),
                ("x-api-key", "mine"),
                ("x_api_key", "sneaky"),
            ],
        );
        let ok = applied(inject(&b, &tls(), &r, 0).unwrap());
        let h = ok.headers[0].header.as_ref().unwrap();
        assert_eq!((h.key.as_str(), h.value.as_bytes()), ("x-api-key", SECRET));
        assert_eq!(
            ok.headers[0].append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        let mut removed = ok.headers_to_remove.clone();
        removed.sort();
        assert_eq!(
            removed,
            ["authorization", "x_api_key"],
            "never the credential's own header"
        );
        // The record and the input name the source, never the value.
        let rec = record(&b, true).to_string();
        assert!(rec.contains("secret ns/s key token") && rec.contains("42") && !rec.contains("s3cr3t"));
        let input = serde_json::to_string(&input_value(&b)).unwrap();
        assert!(
            input.contains("\"brokered\":true") && !input.contains("s3cr3t"),
            "{input}"
        );
        let mut logged: BTreeMap<String, String> = [("x-api-key".to_string(), "mine".to_string())].into();
        redact_header(&mut logged, &b);
        assert_eq!(logged["x-api-key"], "[REDACTED]");
    }

    #[test]
    fn authorization_gets_its_prefix_and_a_policy_header_of_that_name_is_dropped() {
        let d = decl(Placement::Header("authorization".into()), false);
        let c = cred(&d);
        let b = Brokered {
            declaration: &d,
            credential: Ok(&c),
        };
        let i = inject(&b, &tls(), &req("/", &[("authorization", "Bearer stolen")]), 0).unwrap();
        let mut ok = OkHttpResponse {
            headers: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "Authorization".into(),
                    value: "from policy".into(),
                    ..HeaderValue::default()
                }),
                ..HeaderValueOption::default()
            }],
            ..OkHttpResponse::default()
        };
        i.apply(&mut ok);
        assert_eq!(ok.headers.len(), 1);
        assert_eq!(
            ok.headers[0].header.as_ref().unwrap().value,
            format!("Bearer {}", String::from_utf8_lossy(SECRET))
        );
        assert!(ok.headers_to_remove.is_empty(), "{:?}", ok.headers_to_remove);
    }

    #[test]
    fn deny_mode_refuses_the_agents_own_value() {
        let d = decl(Placement::Header("authorization".into()), true);
        let c = cred(&d);
        let b = Brokered {
            declaration: &d,
            credential: Ok(&c),
        };
        let err = inject(&b, &tls(), &req("/", &[("authorization", "Bearer stolen")]), 0).unwrap_err();
        assert_eq!(err.result, "agent_supplied_denied");
        assert!(err.reason.contains("agentSupplied: Deny"), "{}", err.reason);
        assert!(inject(&b, &tls(), &req("/", &[]), 0).is_ok());
    }

    #[test]
    fn a_query_credential_is_escaped_and_replaces_every_spelling() {
        let d = decl(Placement::QueryParameter("api_key".into()), false);
        let mut c = cred(&d);
        c.value = Ok(SecretValue::new(b"a b&c=d".to_vec()));
        let b = Brokered {
            declaration: &d,
            credential: Ok(&c),
        };
        let r = req(
            "/v1?x=1&api_key=stolen&api%5Fkey=again&api+key=no",
            &[("authorization", "x")],
        );
        let ok = applied(inject(&b, &tls(), &r, 0).unwrap());
        assert_eq!(ok.query_parameters_to_set.len(), 1);
        assert_eq!(ok.query_parameters_to_set[0].key, "api_key");
        assert_eq!(ok.query_parameters_to_set[0].value, "a%20b%26c%3Dd");
        assert_eq!(ok.query_parameters_to_remove, ["api%5Fkey"]);
        assert_eq!(ok.headers_to_remove, ["authorization"]);
        // Behind a ';' Envoy cannot remove it: denied, whatever the mode.
        let err = inject(&b, &tls(), &req("/v1?x=1;api_key=stolen", &[]), 0).unwrap_err();
        assert_eq!(err.result, "agent_supplied_denied");
    }

    #[test]
    fn plain_http_unavailable_and_expired_are_denies() {
        let d = decl(Placement::Header("authorization".into()), false);
        let mut c = cred(&d);
        let r = req("/", &[]);
        let plain = Target { tls: false, ..tls() };
        let b = Brokered {
            declaration: &d,
            credential: Ok(&c),
        };
        let mut trace = r.clone();
        trace.method = "trace".into();
        let err = inject(&b, &tls(), &trace, 0).unwrap_err();
        assert_eq!(err.result, "reflecting_method", "{}", err.reason);
        let err = inject(&b, &plain, &r, 0).unwrap_err();
        assert_eq!(err.result, "not_tls");
        assert!(
            err.reason.starts_with("a brokered credential is sent only over TLS"),
            "{}",
            err.reason
        );
        let gone = Brokered {
            declaration: &d,
            credential: Err("Secret ns/s has no key token".into()),
        };
        let err = inject(&gone, &tls(), &r, 0).unwrap_err();
        assert_eq!(err.result, "unavailable");
        assert!(err.reason.contains("has no key token"), "{}", err.reason);
        c.expires_unix = 100;
        let b = Brokered {
            declaration: &d,
            credential: Ok(&c),
        };
        assert!(inject(&b, &tls(), &r, 99).is_ok());
        assert_eq!(inject(&b, &tls(), &r, 100).unwrap_err().result, "unavailable");
    }

    #[test]
    fn the_target_port_follows_the_path() {
        let set = PolicySet::default();
        let mut r = req("/", &[(CONNECT_AUTHORITY_HEADER, "api.example.com:8443")]);
        r.host = "api.example.com:8443".into();
        assert_eq!(
            target(EgressPath::Intercept, &r, &set),
            Some(Target {
                host: "api.example.com".into(),
                port: 8443,
                tls: true
            })
        );
        let mut plain = req("/", &[]);
        plain.scheme = "http".into();
        plain.host = "API.example.com.".into();
        assert_eq!(
            target(EgressPath::Proxy, &plain, &set),
            Some(Target {
                host: "api.example.com".into(),
                port: 80,
                tls: false
            })
        );
        // Envoy originates TLS (`tls: true`): TLS, and 443 when no port is given.
        let spec: mandate_api::crd::AgentPolicySpec = serde_json::from_value(serde_json::json!({
            "modules": [{"name": "a.rego", "rego": "package mandate.authz\nimport rego.v1\ndefault decision := false\n"}],
            "egress": [{"host": "api.example.com", "port": 443, "tls": true}],
        }))
        .unwrap();
        let originating = PolicySet {
            policies: vec![mandate_policy::engine::LoadedPolicy::compile("p".into(), &spec).unwrap()],
            ..PolicySet::default()
        };
        for path in [EgressPath::Proxy, EgressPath::TransparentHttp] {
            assert_eq!(
                target(path, &plain, &originating),
                Some(Target {
                    host: "api.example.com".into(),
                    port: 443,
                    tls: true
                }),
                "{path:?}"
            );
        }
        let mut explicit = plain.clone();
        explicit.host = "api.example.com:8443".into();
        assert_eq!(
            target(EgressPath::TransparentHttp, &explicit, &originating).map(|t| t.port),
            Some(8443)
        );
        assert_eq!(
            target(EgressPath::TransparentHttp, &explicit, &set).map(|t| t.tls),
            Some(false)
        );
        let mut connect = plain.clone();
        connect.method = "CONNECT".into();
        assert_eq!(target(EgressPath::Proxy, &connect, &set), None);
        assert_eq!(target(EgressPath::Raw, &plain, &set), None);
    }
}
