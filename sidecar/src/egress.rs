//! Which of Envoy's egress paths a Check came from, and what that path adds
//! to the decision.
//!
//! Envoy names the path in the gRPC call's own metadata
//! ([`EGRESS_PATH_METADATA`], set by the injected bootstrap's
//! `initial_metadata`), which the agent cannot reach:
//! - none: the explicit proxy (`HTTP_PROXY`, CONNECT), as before;
//! - `http`: plain HTTP caught by the transparent listener. The agent chose
//!   where to connect and Envoy forwards by the Host header instead, so the
//!   two must agree: the original destination must be one of the addresses
//!   the Host resolves to, or the request is denied;
//! - `sni`: a TLS connection to port 443 caught by the transparent listener,
//!   which Envoy turns into `CONNECT <sni>:443` on an internal listener,
//!   with the original destination in [`ORIGINAL_DST_HEADER`] (only that
//!   listener's requests can carry it). Decided as that CONNECT; then either
//!   intercepted or tunnelled to the SNI's addresses, never the agent's IP;
//! - `intercept`: a request inside intercepted TLS (Envoy terminated it with
//!   a leaf of the pod's CA): decided whole, with the TLS server name, which
//!   must be the request's host;
//! - `raw`: any other TCP connection, decided as `CONNECT <ip>:<port>` on
//!   the original destination (Envoy connects there).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Address, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use regorus::Value;

pub use mandate_api::names::{CONNECT_AUTHORITY_HEADER, EGRESS_PATH_METADATA, ORIGINAL_DST_HEADER};

/// Where a Check came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressPath {
    /// The explicit forward proxy.
    Proxy,
    /// Plain HTTP on the transparent listener.
    TransparentHttp,
    /// TLS to port 443 on the transparent listener, decided on its SNI.
    Sni,
    /// A request inside TLS Envoy intercepted.
    Intercept,
    /// Any other TCP on the transparent listener, decided on ip:port.
    Raw,
}

impl EgressPath {
    /// The path a metadata value names; an unknown one is an error (a deny).
    pub fn from_metadata(value: Option<&str>) -> Result<Self, String> {
        match value {
            None => Ok(Self::Proxy),
            Some("http") => Ok(Self::TransparentHttp),
            Some("sni") => Ok(Self::Sni),
            Some("raw") => Ok(Self::Raw),
            Some("intercept") => Ok(Self::Intercept),
            Some(other) => Err(format!("Envoy named an unknown egress path {other:?}")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::TransparentHttp => "http",
            Self::Sni => "sni",
            Self::Raw => "raw",
            Self::Intercept => "intercept",
        }
    }

    /// Whether the check is a connection's (Envoy's network ext_authz), not
    /// an HTTP request's.
    pub fn is_connection(self) -> bool {
        matches!(self, Self::Sni | Self::Raw)
    }
}

/// The original destination (the address the agent connected to) Envoy
/// reports in `attributes.destination`.
pub fn original_destination(req: &CheckRequest) -> Option<(IpAddr, u16)> {
    let a = req.attributes.as_ref()?.destination.as_ref()?.address.as_ref()?;
    match &a.address {
        Some(address::Address::SocketAddress(s)) => {
            let ip = s.address.parse::<IpAddr>().ok()?;
            let port = match s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p).ok()?,
                _ => return None,
            };
            Some((canonical(ip), port))
        }
        _ => None,
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn sni(req: &CheckRequest) -> Option<&str> {
    req.attributes
        .as_ref()?
        .tls_session
        .as_ref()
        .map(|t| t.sni.as_str())
        .filter(|s| !s.is_empty())
}

/// A connection's check as the CONNECT request it amounts to, so policies
/// decide it as they decide a CONNECT through the proxy: `CONNECT sni:443`
/// on the SNI path, `CONNECT ip:port` on the raw path. Errors are denies.
pub fn as_connect(req: &CheckRequest, path: EgressPath) -> Result<CheckRequest, String> {
    if path == EgressPath::Sni {
        return sni_connect(req);
    }
    let (ip, port) = original_destination(req).ok_or("Envoy did not report the connection's original destination")?;
    let host = match path {
        EgressPath::Raw => match ip {
            IpAddr::V4(v4) => format!("{v4}:{port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        },
        _ => return Err("not a connection's check".into()),
    };
    not_loopback(ip, port)?;
    let mut out = req.clone();
    let attrs = out.attributes.get_or_insert_with(Default::default);
    let request = attrs.request.get_or_insert_with(Request::default);
    request.http = Some(HttpRequest {
        method: "CONNECT".into(),
        host,
        protocol: "TCP".into(),
        ..HttpRequest::default()
    });
    Ok(out)
}

fn not_loopback(ip: IpAddr, port: u16) -> Result<(), String> {
    if ip.is_loopback() || ip.is_unspecified() {
        return Err(format!(
            "the connection's original destination {ip}:{port} is this pod's loopback: it was not redirected, and Envoy would connect to itself"
        ));
    }
    Ok(())
}

/// The SNI path's CONNECT (made by Envoy of a captured TLS connection):
/// checked, with its original destination moved from the header Envoy
/// added into `attributes.destination`, where the other paths have it.
fn sni_connect(req: &CheckRequest) -> Result<CheckRequest, String> {
    let http = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .ok_or("the TLS path's check is not Envoy's CONNECT")?;
    if !http.method.eq_ignore_ascii_case("CONNECT") {
        return Err(format!(
            "the TLS path's check is a {}, not Envoy's CONNECT",
            http.method
        ));
    }
    let name = http.host.rsplit_once(':').map_or("", |(h, _)| h);
    if name.is_empty() || name == "-" {
        return Err(
            "a TLS connection without a server name (SNI) cannot be decided: its destination is unknown".into(),
        );
    }
    let dst: std::net::SocketAddr = http
        .headers
        .get(ORIGINAL_DST_HEADER)
        .ok_or("Envoy did not report the connection's original destination")?
        .parse()
        .map_err(|e| format!("Envoy reported an unreadable original destination: {e}"))?;
    let (ip, port) = (canonical(dst.ip()), dst.port());
    not_loopback(ip, port)?;
    let mut out = req.clone();
    let attrs = out.attributes.get_or_insert_with(Default::default);
    attrs.destination = Some(Peer {
        address: Some(socket_address(&ip.to_string(), u32::from(port))),
        ..Peer::default()
    });
    if let Some(h) = attrs.request.as_mut().and_then(|r| r.http.as_mut()) {
        h.headers.remove(ORIGINAL_DST_HEADER);
    }
    Ok(out)
}

/// The server name a request inside intercepted TLS was sent under, which
/// must be its host (port aside, any case, a trailing dot or not): else the
/// request goes where the handshake did not say.
pub fn intercepted_sni(req: &CheckRequest) -> Result<String, String> {
    let name = sni(req).ok_or("Envoy reported no TLS server name for an intercepted request")?;
    let host = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .map(|h| h.host.as_str())
        .unwrap_or_default();
    let host_only = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let norm = mandate_policy::engine::normalize_host;
    if norm(host_only) != norm(name) {
        return Err(format!(
            "the request's host {host:?} is not the TLS server name {name:?} it was sent under (SNI and Host disagree)"
        ));
    }
    // And the TLS must be the one the decided CONNECT opened: same name, and
    // the request's port that CONNECT's (Envoy carries the authority across).
    let connect = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .and_then(|h| h.headers.get(CONNECT_AUTHORITY_HEADER))
        .map(String::as_str)
        .filter(|c| !c.is_empty() && *c != "-")
        .ok_or("Envoy did not say which CONNECT this intercepted TLS came through")?;
    let (connect_host, connect_port) = connect
        .rsplit_once(':')
        .ok_or_else(|| format!("the CONNECT authority {connect:?} has no port"))?;
    let port_of = |p: &str| p.parse::<u16>().ok();
    let request_port = match host.rsplit_once(':') {
        Some((_, p)) if p.chars().all(|c| c.is_ascii_digit()) => port_of(p),
        _ => Some(443),
    };
    if norm(connect_host) != norm(name) || port_of(connect_port).is_none() || port_of(connect_port) != request_port {
        return Err(format!(
            "the request ({host:?}, TLS server name {name:?}) is not what the CONNECT {connect:?} that opened this TLS was allowed for"
        ));
    }
    Ok(name.to_string())
}

/// `input.egress`: the path, the original destination and, for transparent
/// HTTP, whether the Host agrees with it.
pub fn input_value(path: EgressPath, req: &CheckRequest, host_matches: Option<bool>) -> Value {
    let mut m = regorus::value::Object::new();
    m.insert(Value::from("path"), Value::from(path.as_str()));
    if path != EgressPath::Proxy
        && let Some((ip, port)) = original_destination(req)
    {
        let mut d = regorus::value::Object::new();
        d.insert(Value::from("address"), Value::from(ip.to_string()));
        d.insert(Value::from("port"), Value::from(u64::from(port)));
        m.insert(Value::from("original_destination"), d.into());
    }
    // On the SNI path the server name is the CONNECT's host, Envoy's own.
    let name = match path {
        EgressPath::Sni => req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .and_then(|h| h.host.rsplit_once(':'))
            .map(|(h, _)| h)
            .filter(|h| !h.is_empty() && *h != "-"),
        _ => sni(req),
    };
    if let Some(s) = name {
        m.insert(Value::from("sni"), Value::from(s));
    }
    if let Some(b) = host_matches {
        m.insert(Value::from("host_matches_destination"), Value::Bool(b));
    }
    m.into()
}

/// Resolves Host headers, for the transparent HTTP path's check that the
/// agent connected where its Host says. Answers are kept briefly (so a
/// burst of requests costs one lookup) and the cache is bounded.
#[derive(Debug)]
pub struct HostResolver {
    cache: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
    ttl: Duration,
    timeout: Duration,
    max_entries: usize,
}

impl Default for HostResolver {
    fn default() -> Self {
        Self {
            cache: Mutex::default(),
            ttl: Duration::from_secs(30),
            timeout: Duration::from_secs(2),
            max_entries: 1024,
        }
    }
}

impl HostResolver {
    /// The addresses `name` resolves to (an address literal is itself).
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![canonical(ip)]);
        }
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock()
            && let Some((at, ips)) = cache.get(name)
            && now.duration_since(*at) < self.ttl
        {
            return Ok(ips.clone());
        }
        let lookup = tokio::net::lookup_host((name, 0u16));
        let ips: Vec<IpAddr> = match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Ok(addrs)) => addrs.map(|a| canonical(a.ip())).collect(),
            Ok(Err(e)) => return Err(format!("cannot resolve the Host {name:?}: {e}")),
            Err(_) => return Err(format!("resolving the Host {name:?} timed out")),
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= self.max_entries {
                cache.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
                if cache.len() >= self.max_entries {
                    cache.clear();
                }
            }
            cache.insert(name.to_string(), (now, ips.clone()));
        }
        Ok(ips)
    }

    /// Whether the agent's original destination is where its Host header
    /// says: the same port, and an address the Host resolves to. `Err` when
    /// that cannot be known (a deny).
    pub async fn host_matches(&self, req: &CheckRequest) -> Result<bool, String> {
        let (ip, port) =
            original_destination(req).ok_or("Envoy did not report the connection's original destination")?;
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .ok_or("the CheckRequest has no HTTP request attributes")?;
        let (name, host_port) =
            crate::input::parse_host(&http.host, &http.scheme, &http.method).map_err(|e| e.to_string())?;
        if host_port != port {
            return Ok(false);
        }
        Ok(self.resolve(&name).await?.contains(&ip))
    }
}

/// An address for tests and for Envoy's reports alike.
pub fn socket_address(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(
            envoy_types::pb::envoy::config::core::v3::SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::TlsSession;

    fn conn(ip: &str, port: u32, sni: &str) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                destination: Some(Peer {
                    address: Some(socket_address(ip, port)),
                    ..Peer::default()
                }),
                tls_session: (!sni.is_empty()).then(|| TlsSession { sni: sni.into() }),
                ..AttributeContext::default()
            }),
        }
    }

    /// The CONNECT Envoy makes of a captured TLS connection.
    fn sni_connect_req(authority: &str, original: Option<&str>) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "CONNECT".into(),
                        host: authority.into(),
                        headers: original
                            .map(|o| [(ORIGINAL_DST_HEADER.to_string(), o.to_string())].into())
                            .unwrap_or_default(),
                        ..HttpRequest::default()
                    }),
                    ..Request::default()
                }),
                ..AttributeContext::default()
            }),
        }
    }

    fn intercepted(sni: &str, host: &str) -> CheckRequest {
        via(sni, host, &format!("{sni}:443"))
    }

    fn via(sni: &str, host: &str, connect: &str) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                tls_session: (!sni.is_empty()).then(|| TlsSession { sni: sni.into() }),
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        host: host.into(),
                        headers: [(CONNECT_AUTHORITY_HEADER.to_string(), connect.to_string())].into(),
                        ..HttpRequest::default()
                    }),
                    ..Request::default()
                }),
                ..AttributeContext::default()
            }),
        }
    }

    fn host_of(r: &CheckRequest) -> String {
        r.attributes
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap()
            .host
            .clone()
    }

    #[test]
    fn connections_are_decided_as_the_connect_they_amount_to() {
        let sni = as_connect(
            &sni_connect_req("API.example.com:443", Some("93.184.216.34:443")),
            EgressPath::Sni,
        )
        .unwrap();
        assert_eq!(host_of(&sni), "API.example.com:443");
        // The original destination moves where the other paths have it, and
        // Envoy's header is not left for policy to mistake for the agent's.
        assert_eq!(
            original_destination(&sni),
            Some(("93.184.216.34".parse().unwrap(), 443))
        );
        let v = input_value(EgressPath::Sni, &sni, None);
        assert_eq!(v["sni"], Value::from("API.example.com"));
        assert!(
            !sni.attributes
                .as_ref()
                .unwrap()
                .request
                .as_ref()
                .unwrap()
                .http
                .as_ref()
                .unwrap()
                .headers
                .contains_key(ORIGINAL_DST_HEADER)
        );
        let raw = as_connect(&conn("10.0.0.7", 5432, "db.example.com"), EgressPath::Raw).unwrap();
        // The raw path goes where the agent connected, so it is decided on
        // that address, never on a name the agent wrote.
        assert_eq!(host_of(&raw), "10.0.0.7:5432");
        let v6 = as_connect(&conn("2001:db8::1", 22, ""), EgressPath::Raw).unwrap();
        assert_eq!(host_of(&v6), "[2001:db8::1]:22");
        let mapped = as_connect(&conn("::ffff:10.0.0.7", 22, ""), EgressPath::Raw).unwrap();
        assert_eq!(host_of(&mapped), "10.0.0.7:22");
    }

    #[test]
    fn undecidable_connections_are_errors() {
        for no_sni in ["-:443", ":443"] {
            let err = as_connect(&sni_connect_req(no_sni, Some("93.184.216.34:443")), EgressPath::Sni).unwrap_err();
            assert!(err.contains("SNI"), "{err}");
        }
        for (original, why) in [
            (None, "original destination"),
            (Some("nonsense"), "unreadable"),
            (Some("127.0.0.1:443"), "loopback"),
        ] {
            let err = as_connect(&sni_connect_req("a.example:443", original), EgressPath::Sni).unwrap_err();
            assert!(err.contains(why), "{original:?}: {err}");
        }
        // Not Envoy's CONNECT (a network check, or another method): refused.
        assert!(as_connect(&conn("93.184.216.34", 443, "a.example"), EgressPath::Sni).is_err());
        assert!(
            as_connect(&conn("127.0.0.1", 15002, ""), EgressPath::Raw)
                .unwrap_err()
                .contains("loopback")
        );
        assert!(
            as_connect(&conn("::1", 80, ""), EgressPath::Raw)
                .unwrap_err()
                .contains("loopback")
        );
        assert!(
            as_connect(&CheckRequest::default(), EgressPath::Raw)
                .unwrap_err()
                .contains("original")
        );
        assert!(EgressPath::from_metadata(Some("tcp")).is_err());
        assert_eq!(EgressPath::from_metadata(Some("intercept")), Ok(EgressPath::Intercept));
        assert_eq!(EgressPath::from_metadata(None), Ok(EgressPath::Proxy));
    }

    #[test]
    fn an_intercepted_request_must_go_where_its_handshake_said() {
        for (sni, host) in [
            ("api.example.com", "api.example.com"),
            ("api.example.com", "API.example.com:443"),
            ("api.example.com", "api.example.com."),
        ] {
            assert_eq!(intercepted_sni(&intercepted(sni, host)).as_deref(), Ok(sni), "{host}");
        }
        // SNI fronting: the handshake names one host, the request another.
        let err = intercepted_sni(&intercepted("api.example.com", "evil.example")).unwrap_err();
        assert!(err.contains("SNI and Host disagree"), "{err}");
        assert!(intercepted_sni(&intercepted("", "api.example.com")).is_err());
        assert!(intercepted_sni(&intercepted("api.example.com", "api.example.com.evil:443")).is_err());
        // TLS opened by one CONNECT, then used for another host or port.
        for (sni, host, connect) in [
            ("b.example", "b.example", "a.example:443"),
            ("b.example", "b.example:8443", "b.example:443"),
            ("b.example", "b.example", "-"),
            ("b.example", "b.example", ""),
            ("b.example", "b.example", "b.example"),
        ] {
            assert!(
                intercepted_sni(&via(sni, host, connect)).is_err(),
                "{host} via {connect:?}"
            );
        }
        assert!(intercepted_sni(&via("b.example", "b.example:8443", "b.example:8443")).is_ok());
    }

    #[tokio::test]
    async fn a_host_that_disagrees_with_the_destination_is_a_mismatch() {
        let r = HostResolver::default();
        let mut req = conn("10.0.0.7", 80, "");
        let http = |host: &str| {
            Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    host: host.into(),
                    scheme: "http".into(),
                    ..HttpRequest::default()
                }),
                ..Request::default()
            })
        };
        req.attributes.as_mut().unwrap().request = http("10.0.0.7");
        assert_eq!(r.host_matches(&req).await, Ok(true));
        req.attributes.as_mut().unwrap().request = http("10.0.0.8");
        assert_eq!(r.host_matches(&req).await, Ok(false));
        req.attributes.as_mut().unwrap().request = http("10.0.0.7:8080");
        assert_eq!(r.host_matches(&req).await, Ok(false), "the port must agree too");
        req.attributes.as_mut().unwrap().request = http("localhost");
        assert_eq!(r.host_matches(&req).await, Ok(false));
        req.attributes.as_mut().unwrap().request = http("bad host");
        assert!(r.host_matches(&req).await.is_err());
    }
}
