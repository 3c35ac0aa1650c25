//! The input document a policy sees, built from Envoy's CheckRequest.
//!
//! A superset of what the OPA-Envoy plugin gives (protojson field names under
//! `attributes`, plus `parsed_path`, `parsed_query`, `parsed_body`,
//! `truncated_body`, `version`), so OPA-Envoy policies run unchanged; and
//! Mandate's own `agent` and `policy`.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{Address, Metadata, address};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use regorus::Value;
use regorus::value::Object;

/// Limits on what is parsed out of a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bodies longer than this are not parsed (`parsed_body` stays null) and
    /// the request is denied: policy cannot see what it would allow.
    pub max_body_bytes: usize,
    /// JSON nested deeper than this is refused.
    pub max_json_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_json_depth: 64,
        }
    }
}

/// Why a request cannot be turned into an input document: each is a deny.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("the CheckRequest has no HTTP request attributes")]
    NoHttp,
    #[error("the request body is {size} bytes, over the {limit}-byte limit policy may inspect")]
    BodyTooLarge { size: usize, limit: usize },
    #[error(
        "the request body is larger than Envoy buffers for policy (with_request_body.max_request_bytes) and arrived cut short, so no policy can see all of it"
    )]
    PartialBody,
    #[error("the body claims to be JSON but does not parse: {0}")]
    BadJson(String),
    #[error("the JSON body nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("the path {0:?} has a malformed percent escape (a '%' not followed by two hex digits)")]
    BadPath(String),
    #[error("the host {0:?} is not a host name or address with an optional port 1-65535")]
    BadHost(String),
}

/// Who is asking: what the sidecar knows of its agent (empty standalone
/// unless configured).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Agent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// The parts of a request the decision log and responses need, without a
/// second pass over the CheckRequest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub method: String,
    pub host: String,
    pub path: String,
}

/// Build the input document (without `policy`, which the engine adds per
/// policy), directly as the value regorus evaluates (no intermediate JSON
/// tree). Errors are reasons to deny.
pub fn build(req: &CheckRequest, agent: &Agent, limits: Limits) -> Result<(Value, Summary), InputError> {
    let attrs = req.attributes.as_ref();
    let http = attrs
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .ok_or(InputError::NoHttp)?;

    let body_bytes: &[u8] = if !http.raw_body.is_empty() {
        &http.raw_body
    } else {
        http.body.as_bytes()
    };
    if body_bytes.len() > limits.max_body_bytes {
        return Err(InputError::BodyTooLarge {
            size: body_bytes.len(),
            limit: limits.max_body_bytes,
        });
    }
    let (path_only, query) = split_path(&http.path);
    let content_type = http.headers.get("content-type").map(String::as_str).unwrap_or("");
    // Envoy sets x-envoy-auth-partial-body when it cut the body at its own limit.
    let truncated = http
        .headers
        .get("x-envoy-auth-partial-body")
        .is_some_and(|v| v == "true");
    // A body policy cannot see whole is a deny: padding a request past the
    // buffer must not hide what a body rule would refuse. (Envoy writes this
    // header itself whenever it buffers bodies, over any the agent sent.)
    // Envoy says "false" for a body stopped exactly at its buffer, with more
    // to come, so a body of the limit's size counts as cut short too (the
    // injector gives Envoy and the sidecar the same limit).
    if truncated || body_bytes.len() >= limits.max_body_bytes {
        return Err(InputError::PartialBody);
    }
    let parsed_body = parse_body(content_type, body_bytes, limits)?;
    let (host_name, host_port) = parse_host(&http.host, &http.scheme, &http.method)?;

    let mut attributes = Object::new();
    if let Some(a) = attrs {
        if let Some(p) = &a.source {
            attributes.insert(key("source"), peer(p));
        }
        if let Some(p) = &a.destination {
            attributes.insert(key("destination"), peer(p));
        }
        if let Some(r) = &a.request {
            attributes.insert(key("request"), request(r));
        }
        if !a.context_extensions.is_empty() {
            attributes.insert(key("contextExtensions"), string_map(&a.context_extensions));
        }
        attributes.insert(
            key("metadataContext"),
            a.metadata_context
                .as_ref()
                .map(metadata)
                .unwrap_or_else(Value::new_object),
        );
    }

    let input = object([
        ("attributes", attributes.into()),
        ("parsed_path", path_segments(path_only)?),
        ("parsed_query", parse_query(query)),
        (
            "parsed_host",
            object([
                ("name", Value::from(host_name)),
                ("port", Value::from(u64::from(host_port))),
            ]),
        ),
        ("parsed_body", parsed_body),
        ("truncated_body", Value::Bool(truncated)),
        (
            "version",
            object([("encoding", Value::from("protojson")), ("ext_authz", Value::from("v3"))]),
        ),
        ("agent", agent_value(agent)),
    ]);
    let summary = Summary {
        method: http.method.clone(),
        host: http.host.clone(),
        path: path_only.to_string(),
    };
    Ok((input, summary))
}

fn key(k: &str) -> Value {
    Value::from(k)
}

/// An object from fixed keys.
fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    fields.into_iter().map(|(k, v)| (key(k), v)).collect::<Object>().into()
}

fn string_map<'a>(m: impl IntoIterator<Item = (&'a String, &'a String)>) -> Value {
    m.into_iter()
        .map(|(k, v)| (key(k), Value::from(v.as_str())))
        .collect::<Object>()
        .into()
}

/// `input.agent`: only the fields the sidecar knows.
fn agent_value(a: &Agent) -> Value {
    [
        ("spiffe_id", &a.spiffe_id),
        ("identity", &a.identity),
        ("namespace", &a.namespace),
        ("pod", &a.pod),
        ("service_account", &a.service_account),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_deref().map(|v| (key(k), Value::from(v))))
    .collect::<Object>()
    .into()
}

fn split_path(path: &str) -> (&str, &str) {
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    path.split_once('?').unwrap_or((path, ""))
}

/// `/a/b%20c/` → `["a", "b c", ""]`, as OPA-Envoy parses it (Go's
/// `url.Parse`, then `strings.Split(strings.TrimLeft(path, "/"), "/")`): the
/// path is decoded first, so `%2F` separates segments; every leading `/` is
/// dropped; `//name/rest` names a host, as Go reads it, leaving `/rest`; a
/// malformed escape is an error (a deny). Envoy merges slashes and refuses
/// escaped ones before this, so the last three arise only without it.
fn path_segments(path: &str) -> Result<Value, InputError> {
    let raw = path;
    let path = match path.strip_prefix("//") {
        Some(rest) if !rest.starts_with('/') => rest.split_once('/').map_or(String::new(), |(_, p)| format!("/{p}")),
        _ => path.to_string(),
    };
    let decoded = unescape(&path, false).ok_or_else(|| InputError::BadPath(raw.to_string()))?;
    Ok(Value::from(
        decoded
            .trim_start_matches('/')
            .split('/')
            .map(Value::from)
            .collect::<Vec<_>>(),
    ))
}

/// `API.Example.com.:8443` → `("api.example.com", 8443)`: the host as a
/// policy should compare it (lower case, no trailing dot, no IPv6
/// brackets) and its port (the scheme's when none is given: 443 for https,
/// else 80; a CONNECT must name one). Anything else is an error (a deny), so
/// that no spelling of a host slips past a rule written for another.
pub fn parse_host(authority: &str, scheme: &str, method: &str) -> Result<(String, u16), InputError> {
    let bad = || InputError::BadHost(authority.to_string());
    let (name, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(bad)?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        match after {
            "" => (v6, None),
            _ => (v6, Some(after.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?
        }
        Some(_) => return Err(bad()),
        None if method.eq_ignore_ascii_case("CONNECT") => return Err(bad()),
        None if scheme.eq_ignore_ascii_case("https") => 443,
        None => 80,
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
    if name.is_empty() || !name.chars().all(ok_char) || (name.contains(':') && !authority.starts_with('[')) {
        return Err(bad());
    }
    Ok((name, port))
}

/// `a=1&a=2&b` → `{"a": ["1", "2"], "b": [""]}`, as Go's `url.ParseQuery`
/// (OPA-Envoy's): pairs with a `;` or a malformed escape are skipped, `+`
/// is a space.
fn parse_query(query: &str) -> Value {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty() && !p.contains(';')) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if let (Some(k), Some(v)) = (unescape(k, true), unescape(v, true)) {
            out.entry(k).or_default().push(Value::from(v));
        }
    }
    out.into_iter()
        .map(|(k, v)| (Value::from(k), Value::from(v)))
        .collect::<Object>()
        .into()
}

fn parse_body(content_type: &str, body: &[u8], limits: Limits) -> Result<Value, InputError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime == "application/json" || mime.ends_with("+json") {
        if json_depth_exceeds(body, limits.max_json_depth) {
            return Err(InputError::TooDeep(limits.max_json_depth));
        }
        let text = std::str::from_utf8(body).map_err(|e| InputError::BadJson(format!("not UTF-8: {e}")))?;
        return Value::from_json_str(text).map_err(|e| InputError::BadJson(e.to_string()));
    }
    if mime == "application/x-www-form-urlencoded" {
        return Ok(parse_query(&String::from_utf8_lossy(body)));
    }
    Ok(Value::Null)
}

/// Whether `[`/`{` nest deeper than `max` (outside strings), checked before
/// parsing so that a hostile body cannot exhaust the parser's stack.
fn json_depth_exceeds(body: &[u8], max: usize) -> bool {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// `%XX` decoding as Go's `url.PathUnescape` (`plus_is_space`: as
/// `url.QueryUnescape`); `None` for a `%` not followed by two hex digits.
pub(crate) fn unescape(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = |at: usize| bytes.get(at).and_then(|c| (*c as char).to_digit(16));
                let (hi, lo) = (hex(i + 1)?, hex(i + 2)?);
                out.push(u8::try_from(hi * 16 + lo).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn peer(p: &Peer) -> Value {
    let mut m = Object::new();
    if let Some(a) = &p.address {
        m.insert(key("address"), address_value(a));
    }
    if !p.service.is_empty() {
        m.insert(key("service"), Value::from(p.service.as_str()));
    }
    if !p.labels.is_empty() {
        m.insert(key("labels"), string_map(&p.labels));
    }
    if !p.principal.is_empty() {
        m.insert(key("principal"), Value::from(p.principal.as_str()));
    }
    if !p.certificate.is_empty() {
        m.insert(key("certificate"), Value::from(p.certificate.as_str()));
    }
    m.into()
}

fn address_value(a: &Address) -> Value {
    match &a.address {
        Some(address::Address::SocketAddress(s)) => {
            let port = match &s.port_specifier {
                Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => {
                    Value::from(*p)
                }
                _ => Value::Null,
            };
            object([(
                "socketAddress",
                object([("address", Value::from(s.address.as_str())), ("portValue", port)]),
            )])
        }
        Some(address::Address::Pipe(p)) => object([("pipe", object([("path", Value::from(p.path.as_str()))]))]),
        _ => Value::new_object(),
    }
}

fn request(r: &Request) -> Value {
    let mut m = Object::new();
    if let Some(t) = &r.time {
        m.insert(key("time"), Value::from(format_time(t.seconds, t.nanos)));
    }
    if let Some(h) = &r.http {
        m.insert(key("http"), http_value(h));
    }
    m.into()
}

fn http_value(h: &HttpRequest) -> Value {
    let mut m = Object::new();
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            m.insert(key(k), Value::from(v));
        }
    };
    put("id", &h.id);
    put("method", &h.method);
    put("path", &h.path);
    put("host", &h.host);
    put("scheme", &h.scheme);
    put("query", &h.query);
    put("fragment", &h.fragment);
    put("protocol", &h.protocol);
    put("body", &h.body);
    m.insert(key("headers"), string_map(&h.headers));
    if h.size != 0 {
        // protojson writes int64 as a string
        m.insert(key("size"), Value::from(h.size.to_string()));
    }
    m.into()
}

fn metadata(md: &Metadata) -> Value {
    let filter: Object = md
        .filter_metadata
        .iter()
        .map(|(k, v)| (key(k), struct_value(v)))
        .collect();
    object([("filterMetadata", filter.into())])
}

fn struct_value(s: &envoy_types::pb::google::protobuf::Struct) -> Value {
    s.fields
        .iter()
        .map(|(k, v)| (key(k), proto_value(v)))
        .collect::<Object>()
        .into()
}

fn proto_value(v: &envoy_types::pb::google::protobuf::Value) -> Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    match &v.kind {
        Some(Kind::NullValue(_)) | None => Value::Null,
        Some(Kind::NumberValue(n)) => Value::from(*n),
        Some(Kind::StringValue(s)) => Value::from(s.as_str()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_value(s),
        Some(Kind::ListValue(l)) => Value::from(l.values.iter().map(proto_value).collect::<Vec<_>>()),
    }
}

/// RFC 3339 in UTC, as protojson writes a Timestamp.
fn format_time(seconds: i64, nanos: i32) -> String {
    let ts = jiff::Timestamp::new(seconds, nanos).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    ts.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use serde_json::json;

    /// The document as JSON, to index in assertions.
    fn build_json(req: &CheckRequest) -> (serde_json::Value, Summary) {
        let (v, summary) = build(req, &Agent::default(), Limits::default()).unwrap();
        (serde_json::to_value(&v).unwrap(), summary)
    }

    fn to_json(v: Value) -> serde_json::Value {
        serde_json::to_value(&v).unwrap()
    }

    fn check(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        method: method.into(),
                        path: path.into(),
                        host: "api.example.com".into(),
                        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                        body: body.into(),
                        ..HttpRequest::default()
                    }),
                }),
                ..AttributeContext::default()
            }),
        }
    }

    #[test]
    fn opa_envoy_fields_are_there() {
        let req = check(
            "POST",
            "/v1/tools/run%20it?x=1&x=2&y=a+b",
            &[("content-type", "application/json")],
            r#"{"tool":"search"}"#,
        );
        let (input, summary) = build_json(&req);
        assert_eq!(input["attributes"]["request"]["http"]["method"], "POST");
        assert_eq!(
            input["attributes"]["request"]["http"]["headers"]["content-type"],
            "application/json"
        );
        assert_eq!(input["parsed_path"], json!(["v1", "tools", "run it"]));
        assert_eq!(input["parsed_query"], json!({"x": ["1", "2"], "y": ["a b"]}));
        assert_eq!(input["parsed_body"], json!({"tool": "search"}));
        assert_eq!(input["truncated_body"], false);
        assert_eq!(input["version"], json!({"encoding": "protojson", "ext_authz": "v3"}));
        assert_eq!(
            summary,
            Summary {
                method: "POST".into(),
                host: "api.example.com".into(),
                path: "/v1/tools/run%20it".into()
            }
        );
    }

    #[test]
    fn the_whole_document_is_what_opa_envoy_gives_plus_the_agent() {
        use envoy_types::pb::envoy::config::core::v3::SocketAddress;
        use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
        use envoy_types::pb::google::protobuf::value::Kind;
        use envoy_types::pb::google::protobuf::{ListValue, Struct, Timestamp, Value as PValue};
        let mut req = check("GET", "/a?q=1", &[("accept", "text/plain")], "");
        let attrs = req.attributes.as_mut().unwrap();
        attrs.source = Some(Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "10.1.2.3".into(),
                    port_specifier: Some(PortSpecifier::PortValue(43210)),
                    ..SocketAddress::default()
                })),
            }),
            principal: "spiffe://example.org/agent".into(),
            labels: [("app".to_string(), "agent".to_string())].into(),
            ..Peer::default()
        });
        attrs.context_extensions = [("team".to_string(), "research".to_string())].into();
        let n = |k| PValue { kind: Some(k) };
        attrs.metadata_context = Some(Metadata {
            filter_metadata: [(
                "mandate".to_string(),
                Struct {
                    fields: [
                        ("n".to_string(), n(Kind::NumberValue(2.5))),
                        ("ok".to_string(), n(Kind::BoolValue(true))),
                        (
                            "l".to_string(),
                            n(Kind::ListValue(ListValue {
                                values: vec![n(Kind::StringValue("x".into()))],
                            })),
                        ),
                    ]
                    .into(),
                },
            )]
            .into(),
            ..Metadata::default()
        });
        attrs.request.as_mut().unwrap().time = Some(Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        });
        let agent = Agent {
            identity: Some("researcher".into()),
            pod: Some("agent-0".into()),
            ..Agent::default()
        };
        let (doc, _) = build(&req, &agent, Limits::default()).unwrap();
        let got = serde_json::to_value(&doc).unwrap();
        let want = json!({
            "attributes": {
                "source": {
                    "address": {"socketAddress": {"address": "10.1.2.3", "portValue": 43210}},
                    "labels": {"app": "agent"},
                    "principal": "spiffe://example.org/agent"
                },
                "request": {
                    "time": "2023-11-14T22:13:20Z",
                    "http": {"method": "GET", "path": "/a?q=1", "host": "api.example.com",
                             "headers": {"accept": "text/plain"}}
                },
                "contextExtensions": {"team": "research"},
                "metadataContext": {"filterMetadata": {"mandate": {"n": 2.5, "ok": true, "l": ["x"]}}}
            },
            "parsed_path": ["a"],
            "parsed_query": {"q": ["1"]},
            "parsed_host": {"name": "api.example.com", "port": 80},
            "parsed_body": null,
            "truncated_body": false,
            "version": {"encoding": "protojson", "ext_authz": "v3"},
            "agent": {"identity": "researcher", "pod": "agent-0"}
        });
        assert_eq!(got, want);
        // What regorus evaluates is exactly that JSON, read the usual way.
        assert_eq!(doc, Value::from(want));
    }

    #[test]
    fn form_bodies_are_parsed_and_others_are_not() {
        let req = check(
            "POST",
            "/",
            &[("content-type", "application/x-www-form-urlencoded")],
            "a=1&b=two+words",
        );
        let (input, _) = build_json(&req);
        assert_eq!(input["parsed_body"], json!({"a": ["1"], "b": ["two words"]}));
        let req = check("POST", "/", &[("content-type", "text/plain")], "hello");
        let (input, _) = build_json(&req);
        assert_eq!(input["parsed_body"], serde_json::Value::Null);
    }

    #[test]
    fn bad_bodies_are_reasons_to_deny() {
        let json_ct = [("content-type", "application/json")];
        assert!(matches!(
            build(
                &check("POST", "/", &json_ct, "{not json"),
                &Agent::default(),
                Limits::default()
            ),
            Err(InputError::BadJson(_))
        ));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            build(
                &check("POST", "/", &json_ct, &deep),
                &Agent::default(),
                Limits::default()
            )
            .unwrap_err(),
            InputError::TooDeep(64)
        );
        // Envoy cut the body at its buffer: policy cannot see it whole.
        assert_eq!(
            build(
                &check(
                    "POST",
                    "/",
                    &[
                        ("content-type", "application/json"),
                        ("x-envoy-auth-partial-body", "true")
                    ],
                    "{\"cmd\": \"ls\", \"pad\": \"xxxx"
                ),
                &Agent::default(),
                Limits::default()
            )
            .unwrap_err(),
            InputError::PartialBody
        );
        let whole = check("POST", "/", &[("x-envoy-auth-partial-body", "false")], "{}");
        assert!(build(&whole, &Agent::default(), Limits::default()).is_ok());
        // Stopped exactly at the buffer (Envoy then says "false"): cut short too.
        let limits = Limits {
            max_body_bytes: 16,
            ..Limits::default()
        };
        let at_limit = check("POST", "/", &[("x-envoy-auth-partial-body", "false")], &"x".repeat(16));
        assert_eq!(
            build(&at_limit, &Agent::default(), limits).unwrap_err(),
            InputError::PartialBody
        );
        let below = check("POST", "/", &[("x-envoy-auth-partial-body", "false")], &"x".repeat(15));
        assert!(build(&below, &Agent::default(), limits).is_ok());
        let big = "x".repeat(2 * 1024 * 1024);
        assert!(matches!(
            build(&check("POST", "/", &[], &big), &Agent::default(), Limits::default()),
            Err(InputError::BodyTooLarge { .. })
        ));
        assert_eq!(
            build(&CheckRequest::default(), &Agent::default(), Limits::default()).unwrap_err(),
            InputError::NoHttp
        );
    }

    #[test]
    fn paths_and_queries_parse_like_opa_envoy() {
        let segs = |p: &str| path_segments(p).map(to_json);
        assert_eq!(segs("/"), Ok(json!([""])));
        assert_eq!(segs(""), Ok(json!([""])));
        assert_eq!(segs("/a/b/"), Ok(json!(["a", "b", ""])));
        assert_eq!(segs("/b%20c"), Ok(json!(["b c"])));
        // Decoded, then split: an escaped slash separates.
        assert_eq!(segs("/v1%2F..%2Fadmin"), Ok(json!(["v1", "..", "admin"])));
        // Every leading slash goes; "//name" is a host to Go's url.Parse.
        assert_eq!(segs("///a"), Ok(json!(["a"])));
        assert_eq!(segs("//admin/x"), Ok(json!(["x"])));
        assert_eq!(segs("//admin"), Ok(json!([""])));
        // '+' is a plus in a path.
        assert_eq!(segs("/a+b"), Ok(json!(["a+b"])));
        // A malformed escape is a deny, with the path in the reason.
        for bad in ["/a%zz", "/a%4", "/%", "/%+1"] {
            assert_eq!(segs(bad), Err(InputError::BadPath(bad.into())), "{bad}");
        }
        assert_eq!(split_path("/a?q=1#frag"), ("/a", "q=1"));

        let q = |s: &str| to_json(parse_query(s));
        assert_eq!(
            q("a=1&a=2&b&c=x+y%21"),
            json!({"a": ["1", "2"], "b": [""], "c": ["x y!"]})
        );
        // Go skips pairs with ';' or a bad escape, keeps an empty key.
        assert_eq!(q("a=1;b=2&c=%zz&d=1&=e"), json!({"d": ["1"], "": ["e"]}));
        assert_eq!(unescape("%41%62", false).as_deref(), Some("Ab"));
    }

    #[test]
    fn hosts_are_normalized_and_bad_ones_denied() {
        let h = |a: &str, scheme: &str, method: &str| parse_host(a, scheme, method);
        assert_eq!(h("API.Example.com.", "http", "GET"), Ok(("api.example.com".into(), 80)));
        assert_eq!(
            h("api.example.com:8443", "", "GET"),
            Ok(("api.example.com".into(), 8443))
        );
        assert_eq!(
            h("api.example.com", "https", "GET"),
            Ok(("api.example.com".into(), 443))
        );
        assert_eq!(
            h("api.example.com:443", "", "CONNECT"),
            Ok(("api.example.com".into(), 443))
        );
        assert_eq!(h("10.0.0.1:80", "http", "GET"), Ok(("10.0.0.1".into(), 80)));
        assert_eq!(h("[::1]:8080", "http", "GET"), Ok(("::1".into(), 8080)));
        assert_eq!(h("[::1]", "http", "GET"), Ok(("::1".into(), 80)));
        for bad in [
            "",
            ":80",
            "api.example.com:",
            "api.example.com:0",
            "api.example.com:65536",
            "api.example.com:+80",
            "api.example.com:80:80",
            "a b.example",
            "evil.example/x",
            "user@evil.example",
            "::1",
            "[::1",
            "[zz]:80",
            "[::1]80",
        ] {
            assert_eq!(h(bad, "http", "GET"), Err(InputError::BadHost(bad.into())), "{bad:?}");
        }
        // A CONNECT names its port.
        assert_eq!(
            h("api.example.com", "", "CONNECT"),
            Err(InputError::BadHost("api.example.com".into()))
        );
    }

    #[test]
    fn a_bad_path_escape_is_a_reason_to_deny() {
        let req = check("GET", "/files/%zz", &[], "");
        assert_eq!(
            build(&req, &Agent::default(), Limits::default()).map(|_| ()),
            Err(InputError::BadPath("/files/%zz".into()))
        );
    }
}
