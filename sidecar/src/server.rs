//! `envoy.service.auth.v3.Authorization/Check`: build the input, decide,
//! record, answer. Every path out of here that is not an allow is a deny.

use mandate_api::names::{DECISION_HEADER, TLS_MODE_HEADER, UPSTREAM_TLS_HEADER};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use rand::Rng;
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::broker;
use crate::decision_log::DecisionLog;
use crate::egress::{EGRESS_PATH_METADATA, EgressPath, HostResolver};
use crate::input::{self, Agent, Limits, Summary};
use crate::metrics::Metrics;
use mandate_policy::engine::{Decision, SharedPolicies};

/// The Check service.
#[derive(Debug, Clone)]
pub struct Authz {
    pub policies: SharedPolicies,
    pub log: Arc<DecisionLog>,
    pub metrics: Arc<Metrics>,
    pub agent: Agent,
    pub limits: Limits,
    /// When the sidecar runs with an SVID: the current one (none = deny all).
    pub svid: Option<crate::svid::SharedSvid>,
    /// Resolves Host headers on the transparent HTTP path.
    pub resolver: Arc<HostResolver>,
    /// TLS interception is on (the sidecar serves leaves over SDS): an
    /// allowed CONNECT to TLS it intercepts is marked so that Envoy
    /// terminates it instead of tunnelling it.
    pub intercept: bool,
}

/// Whether an allowed CONNECT to `authority` is intercepted: TLS to 443, or
/// to a host a policy declares `tlsMode: Intercept`, unless a policy
/// declares the host `Passthrough` (pinned clients). An undeclared host on
/// 443 is intercepted too, so that its handshake fails (no leaf is minted
/// for it) rather than pass unseen.
pub fn intercepts(set: &mandate_policy::engine::PolicySet, authority: &str) -> bool {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
        None => (authority, ""),
    };
    // The port as a number (`0443` is 443 to Envoy too).
    !set.passes_through(host) && (port.parse::<u16>() == Ok(443) || set.intercepts(host))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn decision_id() -> String {
    let v: u128 = rand::rng().random();
    format!("{v:032x}")
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            ..HeaderValue::default()
        }),
        ..HeaderValueOption::default()
    }
}

impl Authz {
    /// Decide one request from the explicit proxy (the whole Check, minus gRPC).
    pub fn decide(&self, req: &CheckRequest) -> (String, Decision, CheckResponse) {
        self.decide_on(req, Ok(EgressPath::Proxy), None)
    }

    /// Decide one check from an egress path (`Err`: the path is unknown, a
    /// deny); on the transparent HTTP path, with whether the Host agrees
    /// with where the agent connected.
    pub fn decide_on(
        &self,
        original: &CheckRequest,
        path: Result<EgressPath, String>,
        host_matches: Option<Result<bool, String>>,
    ) -> (String, Decision, CheckResponse) {
        let started = Instant::now();
        let id = decision_id();
        let set = self.policies.load();
        // A connection's check is decided as the CONNECT it amounts to.
        let connect;
        let (req, refused) = match path {
            Ok(p) if p.is_connection() => match crate::egress::as_connect(original, p) {
                Ok(c) => {
                    connect = c;
                    (&connect, None)
                }
                Err(e) => (original, Some(e)),
            },
            Ok(EgressPath::Intercept) => match crate::egress::intercepted_sni(original) {
                Ok(_) => (original, None),
                Err(e) => (original, Some(e)),
            },
            Ok(_) => (original, None),
            Err(ref e) => (original, Some(e.clone())),
        };
        let path_now = path.as_ref().copied().unwrap_or(EgressPath::Proxy);
        // A request to a destination that brokers a credential (not one
        // that is refused anyway).
        let target = match refused {
            None => broker::http(req).and_then(|h| broker::target(path_now, h, &set)),
            Some(_) => None,
        };
        let brokered = target.as_ref().and_then(|t| set.brokered(&t.host, t.port));
        let matches = match &host_matches {
            Some(Ok(m)) => Some(*m),
            _ => None,
        };
        let refused = refused.or(match host_matches {
            Some(Err(e)) => Some(format!("the Host cannot be checked against the original destination: {e}")),
            Some(Ok(false)) => Some(
                "the Host header names another destination than the one the agent connected to (original destination and Host disagree), so the request is not what it seems"
                    .into(),
            ),
            _ => None,
        });
        let http_headers = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|h| &h.headers);
        // With an SVID source, the agent is who the SVID says, and without a
        // valid SVID nothing is decided.
        let svid = self.svid.as_ref().map(|s| s.load_full());
        let agent_now;
        let agent = match &svid {
            Some(Some(s)) if s.valid_now() => {
                agent_now = Agent {
                    spiffe_id: Some(s.spiffe_id.clone()),
                    // SPIRE's SVIDs do not name an AgentIdentity; the one the
                    // pod was injected as (checked against the SVID) stands.
                    identity: if s.identity.is_empty() {
                        self.agent.identity.clone()
                    } else {
                        Some(s.identity.clone())
                    },
                    ..self.agent.clone()
                };
                &agent_now
            }
            _ => &self.agent,
        };
        let no_svid = matches!(&svid, Some(None)) || matches!(&svid, Some(Some(s)) if !s.valid_now());
        let (mut decision, summary) = match input::build(req, agent, self.limits) {
            Ok((_, summary)) if refused.is_some() => (
                Decision {
                    reason: format!(
                        "the request cannot be decided: {}",
                        refused.as_deref().unwrap_or_default()
                    ),
                    ..Decision::default()
                },
                summary,
            ),
            Ok((_, summary)) if no_svid => (
                Decision {
                    reason: "the sidecar holds no valid SVID (its workload identity), so it decides nothing".into(),
                    ..Decision::default()
                },
                summary,
            ),
            Ok((mut doc, summary)) => {
                if let Ok(m) = doc.as_object_mut() {
                    m.insert(
                        regorus::Value::from("egress"),
                        crate::egress::input_value(path_now, req, matches),
                    );
                    if let Some(tls) = tls_input(path_now, &summary, &set, self.intercept) {
                        m.insert(regorus::Value::from("tls"), tls);
                    }
                    if let Some(b) = &brokered {
                        m.insert(regorus::Value::from("credential"), broker::input_value(b));
                    }
                }
                (set.decide_prepared(doc), summary)
            }
            Err(e) => {
                let summary = http_summary(req);
                (
                    Decision {
                        reason: format!(
                            "the request cannot be decided: {}",
                            refused.unwrap_or_else(|| e.to_string())
                        ),
                        ..Decision::default()
                    },
                    summary,
                )
            }
        };
        // The credential, for an allowed request: added, or the request denied.
        let mut injection = None;
        let mut credential_result = None;
        if decision.allow
            && let (Some(b), Some(t), Some(h)) = (&brokered, &target, broker::http(req))
        {
            match broker::inject(b, t, h, unix_now()) {
                Ok(i) => {
                    injection = Some(i);
                    credential_result = Some("injected");
                }
                Err(refusal) => {
                    credential_result = Some(refusal.result);
                    decision = Decision {
                        reason: refusal.reason,
                        verdicts: decision.verdicts,
                        ..Decision::default()
                    };
                }
            }
        }
        let latency = started.elapsed();

        let mut record = serde_json::Map::new();
        record.insert("decision_id".into(), json!(id));
        record.insert("time".into(), json!(jiff::Timestamp::now().to_string()));
        record.insert("agent".into(), json!(agent));
        let mut headers: BTreeMap<String, String> = http_headers
            .map(|h| self.log.redact_headers(h.iter()))
            .unwrap_or_default();
        if let Some(b) = &brokered {
            broker::redact_header(&mut headers, b);
        }
        record.insert(
            "request".into(),
            json!({"method": summary.method, "host": summary.host, "path": summary.path, "headers": headers}),
        );
        if path_now != EgressPath::Proxy {
            record.insert(
                "egress".into(),
                serde_json::to_value(crate::egress::input_value(path_now, req, matches)).unwrap_or_default(),
            );
        }
        if let Some(b) = &brokered {
            record.insert("credential".into(), broker::record(b, injection.is_some()));
        }
        record.insert("policies".into(), json!(decision.verdicts));
        record.insert("result".into(), json!(if decision.allow { "allow" } else { "deny" }));
        if decision.escalate {
            record.insert("escalate".into(), json!(true));
        }
        record.insert("reason".into(), json!(decision.reason));
        record.insert("latency_us".into(), json!(latency.as_micros() as u64));
        if let Err(e) = self.log.write(record) {
            // An action that cannot be recorded does not happen.
            tracing::error!(error = %e, "cannot write the decision log; denying");
            decision = Decision {
                reason: format!("the decision could not be recorded: {e}"),
                verdicts: decision.verdicts,
                ..Decision::default()
            };
            // Nothing unrecorded is added either.
            if injection.take().is_some() {
                credential_result = None;
            }
        }
        self.metrics.observe(&decision, latency);
        if let Some(result) = credential_result {
            self.metrics.credential(result);
        }
        let connect = summary.method.eq_ignore_ascii_case("CONNECT");
        let tls = decision.allow && !connect && set.originates_tls(&summary.host);
        let mut resp = respond(&id, &decision);
        if decision.allow
            && let Some(HttpResponse::OkResponse(ok)) = resp.http_response.as_mut()
        {
            ok.headers.push(HeaderValueOption {
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..header(UPSTREAM_TLS_HEADER, if tls { "true" } else { "false" })
            });
            if connect && self.intercept && intercepts(&set, &summary.host) {
                ok.headers.push(HeaderValueOption {
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..header(TLS_MODE_HEADER, "intercept")
                });
            }
            // Only ever into an allowed request's response.
            if let Some(i) = injection {
                i.apply(ok);
            }
        }
        (id, decision, resp)
    }
}

/// `input.tls`: for a request inside intercepted TLS, its server name; for
/// a CONNECT, its host and whether it will be intercepted.
fn tls_input(
    path: EgressPath,
    summary: &Summary,
    set: &mandate_policy::engine::PolicySet,
    intercept: bool,
) -> Option<regorus::Value> {
    let host_of = |authority: &str| {
        authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    };
    let (sni, intercepted) = match path {
        EgressPath::Intercept => (host_of(&summary.host), true),
        _ if summary.method.eq_ignore_ascii_case("CONNECT") => {
            (host_of(&summary.host), intercept && intercepts(set, &summary.host))
        }
        _ => return None,
    };
    let mut m = regorus::value::Object::new();
    m.insert(regorus::Value::from("sni"), regorus::Value::from(sni));
    m.insert(regorus::Value::from("intercepted"), regorus::Value::Bool(intercepted));
    Some(m.into())
}

fn http_summary(req: &CheckRequest) -> Summary {
    let http = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    Summary {
        method: http.map(|h| h.method.clone()).unwrap_or_default(),
        host: http.map(|h| h.host.clone()).unwrap_or_default(),
        path: http
            .map(|h| h.path.split('?').next().unwrap_or("").to_string())
            .unwrap_or_default(),
    }
}

/// The CheckResponse for a decision.
pub fn respond(id: &str, d: &Decision) -> CheckResponse {
    if d.allow {
        let mut headers: Vec<HeaderValueOption> = d.headers.iter().map(|(k, v)| header(k, v)).collect();
        headers.push(header(DECISION_HEADER, id));
        return CheckResponse {
            status: Some(RpcStatus {
                code: 0,
                ..RpcStatus::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers,
                response_headers_to_add: vec![header(DECISION_HEADER, id)],
                ..OkHttpResponse::default()
            })),
            ..CheckResponse::default()
        };
    }
    let mut headers: Vec<HeaderValueOption> = d.headers.iter().map(|(k, v)| header(k, v)).collect();
    headers.push(header(DECISION_HEADER, id));
    let body = match &d.body {
        Some(b) => b.clone(),
        None => {
            if !d.headers.contains_key("content-type") {
                headers.push(header("content-type", "application/json"));
            }
            json!({"allowed": false, "decision_id": id, "reason": d.reason}).to_string()
        }
    };
    CheckResponse {
        // PERMISSION_DENIED
        status: Some(RpcStatus {
            code: 7,
            message: d.reason.clone(),
            ..RpcStatus::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(d.http_status.unwrap_or(403)),
            }),
            headers,
            body,
        })),
        ..CheckResponse::default()
    }
}

#[tonic::async_trait]
impl Authorization for Authz {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let path = match request.metadata().get(EGRESS_PATH_METADATA) {
            None => Ok(EgressPath::Proxy),
            Some(v) => EgressPath::from_metadata(Some(v.to_str().unwrap_or("(not text)"))),
        };
        let host_matches = match path {
            Ok(EgressPath::TransparentHttp) => Some(self.resolver.host_matches(request.get_ref()).await),
            _ => None,
        };
        let (_, _, resp) = self.decide_on(request.get_ref(), path, host_matches);
        Ok(Response::new(resp))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Request as AttrRequest, TlsSession,
    };
    use mandate_proto::policy::v1::{Credential as WireCredential, Policy as WirePolicy, PolicySet as WireSet};
    use std::sync::Mutex;

    const SECRET: &str = "s3cr3t-brokered-value";

    /// The decision log's lines, kept for the test.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A pushed set: GETs allowed, the rest denied, to api.example.com:443
    /// (brokered) and plain.example.com:80 (brokered, no TLS).
    fn pushed(value: &str, unavailable: &str) -> mandate_policy::engine::PolicySet {
        let spec = serde_json::json!({
            "modules": [{"name": "authz.rego", "rego": "package mandate.authz\nimport rego.v1\ndefault decision := false\ndecision if {\n  input.attributes.request.http.method == \"GET\"\n  input.credential.brokered\n}\n"}],
            "egress": [
                {"host": "api.example.com", "port": 443, "credential": {"secretKeyRef": {"name": "s", "key": "token"}}},
                {"host": "plain.example.com", "port": 80, "credential": {"secretKeyRef": {"name": "s", "key": "token"}}},
            ],
        });
        let parsed: mandate_api::crd::AgentPolicySpec = serde_json::from_value(spec.clone()).unwrap();
        let version = mandate_policy::version(&parsed);
        let cred = |host: &str, port: u32| WireCredential {
            policy: "agents/p".into(),
            host: host.into(),
            port,
            header: "authorization".into(),
            prefix: "Bearer ".into(),
            value: value.as_bytes().to_vec(),
            unavailable: unavailable.into(),
            source: "secret agents/s key token".into(),
            version: "v1".into(),
            ..WireCredential::default()
        };
        let wire = WireSet {
            set_version: "sha256:x".into(),
            policies: vec![WirePolicy {
                namespace: "agents".into(),
                name: "p".into(),
                version,
                spec_json: spec.to_string(),
            }],
            withheld: vec![],
            credentials: vec![cred("api.example.com", 443), cred("plain.example.com", 80)],
        };
        crate::subscribe::build(&wire, mandate_policy::engine::EngineKind::Auto).unwrap()
    }

    fn authz(set: mandate_policy::engine::PolicySet) -> (Authz, Sink) {
        let sink = Sink::default();
        let a = Authz {
            policies: Arc::new(arc_swap::ArcSwap::from_pointee(set)),
            log: Arc::new(DecisionLog::new(Box::new(sink.clone()), &[])),
            metrics: Arc::default(),
            agent: Agent::default(),
            limits: Limits::default(),
            svid: None,
            resolver: Arc::default(),
            intercept: true,
        };
        (a, sink)
    }

    /// A request inside intercepted TLS to `host`.
    fn intercepted(method: &str, host: &str, headers: &[(&str, &str)]) -> CheckRequest {
        let mut h: std::collections::HashMap<String, String> =
            headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        h.insert(crate::egress::CONNECT_AUTHORITY_HEADER.into(), format!("{host}:443"));
        CheckRequest {
            attributes: Some(AttributeContext {
                tls_session: Some(TlsSession { sni: host.into() }),
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        method: method.into(),
                        host: host.into(),
                        path: "/v1/models".into(),
                        scheme: "https".into(),
                        headers: h,
                        ..HttpRequest::default()
                    }),
                    ..AttrRequest::default()
                }),
                ..AttributeContext::default()
            }),
        }
    }

    fn ok(resp: &CheckResponse) -> Option<&OkHttpResponse> {
        match resp.http_response.as_ref()? {
            HttpResponse::OkResponse(ok) => Some(ok),
            _ => None,
        }
    }

    fn sent(resp: &CheckResponse) -> Vec<(String, String)> {
        ok(resp)
            .map(|o| {
                o.headers
                    .iter()
                    .filter_map(|h| h.header.as_ref())
                    .map(|h| (h.key.clone(), h.value.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn an_allowed_intercepted_request_gets_the_credential_and_the_log_never_sees_it() {
        let (a, sink) = authz(pushed(SECRET, ""));
        let req = intercepted("GET", "api.example.com", &[("authorization", "Bearer stolen")]);
        let (_, d, resp) = a.decide_on(&req, Ok(EgressPath::Intercept), None);
        assert!(d.allow, "{}", d.reason);
        assert!(
            sent(&resp).contains(&("authorization".into(), format!("Bearer {SECRET}"))),
            "{resp:?}"
        );
        // Denied (a POST): nothing but the denial.
        let (_, d, resp) = a.decide_on(
            &intercepted("POST", "api.example.com", &[]),
            Ok(EgressPath::Intercept),
            None,
        );
        assert!(!d.allow && ok(&resp).is_none());
        assert!(!format!("{resp:?}").contains(SECRET));
        let log = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(!log.contains(SECRET), "{log}");
        assert!(!log.contains("stolen"), "the agent's authorization is redacted: {log}");
        let records: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(records[0]["credential"]["source"], "secret agents/s key token");
        assert_eq!(records[0]["credential"]["version"], "v1");
        assert_eq!(records[0]["credential"]["injected"], true);
        assert_eq!(records[1]["credential"]["injected"], false);
    }

    #[test]
    fn plain_http_unavailable_and_file_sets_are_denied_with_the_reason() {
        let (a, _) = authz(pushed(SECRET, ""));
        let plain = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        host: "plain.example.com".into(),
                        path: "/".into(),
                        scheme: "http".into(),
                        ..HttpRequest::default()
                    }),
                    ..AttrRequest::default()
                }),
                ..AttributeContext::default()
            }),
        };
        let (_, d, resp) = a.decide(&plain);
        assert!(!d.allow);
        assert!(
            d.reason.starts_with("a brokered credential is sent only over TLS"),
            "{}",
            d.reason
        );
        assert!(!format!("{resp:?}").contains(SECRET));

        let (a, _) = authz(pushed("", "Secret agents/s has no key token"));
        let (_, d, _) = a.decide_on(
            &intercepted("GET", "api.example.com", &[]),
            Ok(EgressPath::Intercept),
            None,
        );
        assert!(!d.allow && d.reason.contains("has no key token"), "{}", d.reason);

        // The same policy from a file: declared, with no value.
        let mut files = pushed(SECRET, "");
        files.credentials.clear();
        files.origin = mandate_policy::engine::SetOrigin::Files;
        let (a, _) = authz(files);
        let (_, d, _) = a.decide_on(
            &intercepted("GET", "api.example.com", &[]),
            Ok(EgressPath::Intercept),
            None,
        );
        assert!(
            !d.allow
                && d.reason
                    .contains("policies loaded from files carry no brokered credentials"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn an_invalid_pushed_value_makes_that_credential_unavailable_not_the_set() {
        let set = pushed("token\r\nx-evil: 1", "");
        assert_eq!(set.policies.len(), 1, "the set is in force");
        let (a, _) = authz(set);
        let (_, d, resp) = a.decide_on(
            &intercepted("GET", "api.example.com", &[]),
            Ok(EgressPath::Intercept),
            None,
        );
        assert!(!d.allow && d.reason.contains("control character"), "{}", d.reason);
        assert!(!format!("{resp:?}").contains("x-evil"));
    }
}
