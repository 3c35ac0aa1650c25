//! Envoy's bootstrap: the egress proxy whose every request the sidecar decides.

use mandate_api::names::{
    AUTHZ_SOCKET, CONNECT_AUTHORITY_HEADER, EGRESS_PATH_METADATA, ENVOY_ADMIN_SOCKET, ORIGINAL_DST_HEADER, SDS_SOCKET,
    TLS_MODE_HEADER,
};
use serde_json::{Value, json};

use super::InjectConfig;

/// Headers of the agent's dropped before anything decides on them: forwarding
/// headers (who the client is, through which proxies), the ones Envoy acts on
/// that edge sanitizing leaves, and Mandate's own (only the sidecar's answer
/// sets them).
const AGENT_HEADERS_DROPPED: [&str; 15] = [
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-forwarded-client-cert",
    "forwarded",
    "x-real-ip",
    "x-envoy-original-dst-host",
    "x-envoy-auth-partial-body",
    "x-envoy-original-path",
    mandate_api::names::UPSTREAM_TLS_HEADER,
    mandate_api::names::DECISION_HEADER,
    TLS_MODE_HEADER,
    CONNECT_AUTHORITY_HEADER,
    ORIGINAL_DST_HEADER,
];

/// Filter state carrying a CONNECT's authority into the interception
/// listener (shared with the internal upstream connection).
const CONNECT_AUTHORITY_STATE: &str = "mandate.connect_authority";

/// Envoy's bootstrap: an HTTP forward proxy on loopback whose every request
/// (CONNECT included) is decided by the sidecar over its unix socket, with
/// `failure_mode_allow: false`. The sidecar's answer steers the request to
/// a plain, a TLS-originating or a tunnelling upstream, so the bootstrap
/// never changes when policies do.
pub fn envoy_bootstrap(cfg: &InjectConfig) -> String {
    envoy_bootstrap_at(
        cfg,
        &Sockets {
            authz: AUTHZ_SOCKET,
            admin: ENVOY_ADMIN_SOCKET,
            sds: SDS_SOCKET,
        },
        "0.0.0.0",
    )
}

/// The unix sockets Envoy talks to: the sidecar's ext_authz and SDS, its own admin.
#[derive(Debug, Clone, Copy)]
pub struct Sockets<'a> {
    pub authz: &'a str,
    pub admin: &'a str,
    pub sds: &'a str,
}

/// [`envoy_bootstrap`] with the sockets and the readiness listener's
/// address chosen (tests run it outside a pod).
pub fn envoy_bootstrap_at(cfg: &InjectConfig, sockets: &Sockets<'_>, health_address: &str) -> String {
    let (authz_socket, admin_socket) = (sockets.authz, sockets.admin);
    let dfp_cache = json!({
        "name": "egress_dns",
        "dns_lookup_family": "V4_PREFERRED",
        "max_hosts": 4096,
    });
    let dfp_cluster = |name: &str, tls: bool| {
        let mut c = json!({
            "name": name,
            "connect_timeout": "5s",
            "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {
                "name": "envoy.clusters.dynamic_forward_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                    "dns_cache_config": dfp_cache,
                },
            },
        });
        if tls && let Some(m) = c.as_object_mut() {
            m.insert(
                "transport_socket".into(),
                json!({
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "common_tls_context": {
                            "validation_context": {"trusted_ca": {"filename": cfg.upstream_ca_file}},
                        },
                    },
                }),
            );
            m.insert(
                "typed_extension_protocol_options".into(),
                json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "upstream_http_protocol_options": {"auto_sni": true, "auto_san_validation": true},
                        "explicit_http_config": {"http_protocol_options": {}},
                    },
                }),
            );
        }
        c
    };
    let authz_grpc = |path: Option<&str>| {
        let mut g = json!({
            "envoy_grpc": {"cluster_name": "mandate_authz"},
            "timeout": format!("{}s", cfg.authz_timeout_ms as f64 / 1000.0),
        });
        // The egress path, in the call's own metadata: Envoy sets it, the
        // agent cannot.
        if let (Some(p), Some(m)) = (path, g.as_object_mut()) {
            m.insert(
                "initial_metadata".into(),
                json!([{"key": EGRESS_PATH_METADATA, "value": p}]),
            );
        }
        g
    };
    // The egress routes: a CONNECT the sidecar marked for interception is
    // terminated into the interception listener; any other CONNECT is
    // tunnelled to its authority (resolved by Envoy); the rest is HTTP.
    let connect_route = |cluster: &str, intercept: bool| {
        let m = if intercept {
            json!({"connect_matcher": {},
                   "headers": [{"name": TLS_MODE_HEADER, "string_match": {"exact": "intercept"}}]})
        } else {
            json!({"connect_matcher": {}})
        };
        json!({"match": m,
               "route": {"cluster": cluster,
                         "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]},
               // A tunnel's stream never ends: decide on
               // host and port without waiting for a body.
               "typed_per_filter_config": {"envoy.filters.http.ext_authz": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                   "check_settings": {"disable_request_body_buffering": true}}}})
    };
    let mut egress_routes = Vec::new();
    if cfg.tls_interception {
        egress_routes.push(connect_route("bump_internal", true));
    }
    egress_routes.extend([
        connect_route("egress_tunnel", false),
        json!({"match": {"prefix": "/", "headers": [
                   {"name": mandate_api::names::UPSTREAM_TLS_HEADER, "string_match": {"exact": "true"}}]},
               "route": {"cluster": "egress_tls", "timeout": "60s"}}),
        json!({"match": {"prefix": "/"},
               "route": {"cluster": "egress_plain", "timeout": "60s"}}),
    ]);
    let egress_routes = Value::Array(egress_routes);
    // Inside intercepted TLS: every request goes out over TLS again (a
    // WebSocket's opening request is decided, the stream after it is not).
    let intercept_routes = json!([{"match": {"prefix": "/"},
                                   "route": {"cluster": "egress_tls", "timeout": "60s"}}]);
    // The CONNECT's authority, remembered for the internal connection it
    // leads to; inside intercepted TLS, written into a header for the
    // sidecar (after the agent's own was dropped).
    let connect_authority = |intercepted: bool| {
        if intercepted {
            json!({
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {"request_mutations": [{"append": {
                        "header": {"key": CONNECT_AUTHORITY_HEADER,
                                   "value": format!("%FILTER_STATE({CONNECT_AUTHORITY_STATE}:PLAIN)%")},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]},
                },
            })
        } else {
            json!({
                "name": "envoy.filters.http.set_filter_state",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
                    "on_request_headers": [{
                        "object_key": CONNECT_AUTHORITY_STATE,
                        "factory_key": "envoy.string",
                        "format_string": {"text_format_source": {"inline_string": "%REQ(:AUTHORITY)%"}},
                        "shared_with_upstream": "ONCE",
                    }],
                },
            })
        }
    };
    let hcm_with = |stat: &str, path: Option<&str>, dropped: &[&str], routes: &Value, tls_session: bool| {
        json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat,
            // The agent is an external client: Envoy drops its
            // x-envoy-* headers (no retry policy replaying one
            // allowed request, no timeouts of its choosing) and
            // writes the forwarding headers itself.
            "use_remote_address": true,
            // No client is internal (an empty list means
            // Envoy's default: loopback and RFC 1918 are).
            "internal_address_config": {"cidr_ranges": [
                {"address_prefix": "255.255.255.255", "prefix_len": 32}]},
            "early_header_mutation_extensions": [{
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": dropped.iter().map(|h| json!({"remove": h})).collect::<Vec<_>>(),
                },
            }],
            // Inside intercepted TLS no upgrade is routed: a WebSocket
            // would be a stream nothing decides after its first request.
            "upgrade_configs": if stat == "intercepted" {
                json!([])
            } else {
                json!([{"upgrade_type": "CONNECT"}])
            },
            // Policy's port follows the scheme: inside intercepted TLS it is
            // https, whatever `:scheme` the client sent.
            "scheme_header_transformation": if stat == "intercepted" {
                json!({"scheme_to_overwrite": "https"})
            } else {
                json!({})
            },
            // Policy sees the path the upstream acts on:
            // `/v1/../admin` is `/admin`, `//admin` is `/admin`,
            // and an escaped slash (`%2F`, `%5C`) is refused (400).
            "normalize_path": true,
            "merge_slashes": true,
            "path_with_escaped_slashes_action": "REJECT_REQUEST",
            "route_config": {
                "name": "egress",
                // Mandate's steering headers (set by Envoy or the sidecar,
                // read by routes and the sidecar) never reach an upstream.
                "request_headers_to_remove": [
                    mandate_api::names::UPSTREAM_TLS_HEADER,
                    TLS_MODE_HEADER,
                    CONNECT_AUTHORITY_HEADER,
                    ORIGINAL_DST_HEADER,
                ],
                "virtual_hosts": [{
                    "name": "egress",
                    "domains": ["*"],
                    "routes": routes,
                }],
            },
            "http_filters": [
                connect_authority(stat == "intercepted"),
                {
                    "name": "envoy.filters.http.ext_authz",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                        "transport_api_version": "V3",
                        "failure_mode_allow": false,
                        "clear_route_cache": true,
                        "status_on_error": {"code": 403},
                        "include_tls_session": tls_session,
                        "with_request_body": {"max_request_bytes": cfg.max_request_bytes, "allow_partial_message": true},
                        "grpc_service": authz_grpc(path),
                    },
                },
                {
                    "name": "envoy.filters.http.dynamic_forward_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                        "dns_cache_config": dfp_cache,
                    },
                },
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
        })
    };
    let hcm = |stat: &str, path: Option<&str>| hcm_with(stat, path, &AGENT_HEADERS_DROPPED, &egress_routes, false);
    let network_authz = |stat: &str, path: &str| {
        json!({
            "name": "envoy.filters.network.ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz",
                "stat_prefix": stat,
                "transport_api_version": "V3",
                "failure_mode_allow": false,
                "include_tls_session": true,
                "grpc_service": authz_grpc(Some(path)),
            },
        })
    };
    // The transparent listener's HTTP: the egress HCM, decided with the
    // original destination (path `http`).
    // A network ext_authz decides on the connection's first bytes, after
    // the filters behind it saw the connection: the TCP proxy connects only
    // once bytes pass the decision (never to a destination still undecided),
    // and so a protocol whose server speaks first gets nothing.
    let tcp_proxy = |stat: &str, cluster: &str| {
        json!({"name": "envoy.filters.network.tcp_proxy",
               "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                   "stat_prefix": stat,
                   "cluster": cluster,
                   "upstream_connect_mode": "ON_DOWNSTREAM_DATA",
                   "max_early_data_bytes": 65536}})
    };
    // Captured TLS to 443 becomes a CONNECT to `<sni>:443` on this internal
    // listener, decided there like the proxy's CONNECT (path `sni`), with
    // the original destination in a header only this path can carry. The
    // sidecar's answer picks interception or a tunnel to the SNI's
    // addresses (never to the address the agent chose).
    // Envoy's own original-destination header is kept here, and only here.
    let tls_connect_dropped: Vec<&str> = AGENT_HEADERS_DROPPED
        .iter()
        .copied()
        .filter(|h| *h != ORIGINAL_DST_HEADER)
        .collect();
    let tls_connect = json!({
        "name": "tls_connect",
        "internal_listener": {},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": hcm_with(
                "transparent_sni",
                Some("sni"),
                &tls_connect_dropped,
                &egress_routes,
                false,
            ),
        }]}],
    });
    // Interception: the agent's TLS is terminated with a leaf for its SNI,
    // fetched on demand from the sidecar over SDS (a name the sidecar does
    // not intercept is removed, and the handshake fails); each request
    // inside is decided (path `intercept`, with the TLS session) and goes
    // out over TLS again, verified against the upstream CAs, with the
    // request's own host as SNI and as the name checked.
    let bump = json!({
        "name": "bump",
        "internal_listener": {},
        "listener_filters": [
            {"name": "envoy.filters.listener.tls_inspector",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
        ],
        "filter_chains": [{
            "filter_chain_match": {"transport_protocol": "tls"},
            // Bounds a handshake parked on SDS.
            "transport_socket_connect_timeout": "10s",
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    // Both required by on_demand_secret (Envoy 1.40).
                    "disable_stateless_session_resumption": true,
                    "disable_stateful_session_resumption": true,
                    "common_tls_context": {
                        "alpn_protocols": ["h2", "http/1.1"],
                        "custom_tls_certificate_selector": {
                            "name": "envoy.tls.certificate_selectors.on_demand_secret",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_selectors.on_demand_secret.v3.Config",
                                "config_source": {
                                    "resource_api_version": "V3",
                                    "initial_fetch_timeout": "5s",
                                    "api_config_source": {
                                        "api_type": "DELTA_GRPC",
                                        "transport_api_version": "V3",
                                        "grpc_services": [{"envoy_grpc": {"cluster_name": "mandate_sds"}}],
                                    },
                                },
                                "certificate_mapper": {
                                    "name": "envoy.tls.certificate_mappers.sni",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_mappers.sni.v3.SNI",
                                        // The sidecar refuses it: no SNI, no leaf.
                                        "default_value": "mandate-no-sni",
                                    },
                                },
                            },
                        },
                    },
                },
            },
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm_with("intercepted", Some("intercept"), &AGENT_HEADERS_DROPPED, &intercept_routes, true),
            }],
        }],
        // Anything but TLS inside an intercepted tunnel is closed.
    });
    let internal_cluster = |name: &str, listener: &str| {
        json!({
            "name": name,
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": listener}}}}]}]},
            "transport_socket": {
                "name": "envoy.transport_sockets.internal_upstream",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
                    "transport_socket": {"name": "envoy.transport_sockets.raw_buffer",
                                         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}},
                },
            },
        })
    };
    let transparent_hcm = hcm("transparent_http", Some("http"));
    let transparent = json!({
        // Where the pod's egress rules send every TCP connection of the
        // agent. original_dst recovers where it was going; the inspectors
        // tell TLS and HTTP from the rest.
        "name": "transparent",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": cfg.transparent_port}},
        "additional_addresses": [{"address": {"socket_address": {"address": "::1", "port_value": cfg.transparent_port}}}],
        "listener_filters": [
            {"name": "envoy.filters.listener.original_dst",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}},
            {"name": "envoy.filters.listener.tls_inspector",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
            {"name": "envoy.filters.listener.http_inspector",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}},
        ],
        // A protocol whose server speaks first sends nothing to inspect:
        // after this, it goes on as raw TCP.
        "listener_filters_timeout": "2s",
        "continue_on_listener_filters_timeout": true,
        "filter_chains": [
            {
                // TLS to 443: a CONNECT to `<sni>:443`, decided on the
                // internal listener (no SNI: `-:443`, denied there).
                "name": "tls_sni",
                "filter_chain_match": {"transport_protocol": "tls", "destination_port": 443},
                "filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "transparent_sni",
                        "cluster": "tls_connect",
                        "tunneling_config": {
                            "hostname": "%REQUESTED_SERVER_NAME%:443",
                            "headers_to_add": [{"header": {
                                "key": ORIGINAL_DST_HEADER,
                                "value": "%DOWNSTREAM_LOCAL_ADDRESS%"}}],
                        },
                    },
                }],
            },
            {
                "name": "http",
                "filter_chain_match": {"application_protocols": ["http/1.0", "http/1.1", "h2c"]},
                "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": transparent_hcm}],
            },
        ],
        // Anything else (TLS to other ports included): decided on the
        // original ip:port, and connected there.
        "default_filter_chain": {
            "name": "raw",
            "filters": [
                network_authz("transparent_raw", "raw"),
                tcp_proxy("transparent_raw", "original_dst"),
            ],
        },
    });
    let mut bootstrap = json!({
        // Admin on a unix socket only Envoy's user may open, never on a
        // port: loopback is the agent's too.
        "admin": {"address": {"pipe": {"path": admin_socket, "mode": 0o600}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "egress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": cfg.proxy_port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm("egress", None),
                    }]}],
                },
                {
                    // Readiness for kubelet, answered by Envoy's own /ready;
                    // nothing else is reachable here.
                    "name": "health",
                    "address": {"socket_address": {"address": health_address, "port_value": cfg.envoy_health_port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "health",
                            "route_config": {"virtual_hosts": [{
                                "name": "health",
                                "domains": ["*"],
                                "routes": [{"match": {"path": "/healthz/ready"},
                                            "route": {"cluster": "envoy_admin", "prefix_rewrite": "/ready"}}],
                            }]},
                            "http_filters": [{
                                "name": "envoy.filters.http.router",
                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                            }],
                        },
                    }]}],
                },
            ],
            "clusters": [
                {
                    "name": "mandate_authz",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        },
                    },
                    "load_assignment": {"cluster_name": "mandate_authz", "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": {"pipe": {"path": authz_socket}}}}]}]},
                },
                {
                    "name": "envoy_admin",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": "envoy_admin", "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": {"pipe": {"path": admin_socket}}}}]}]},
                },
                dfp_cluster("egress_plain", false),
                dfp_cluster("egress_tls", true),
                dfp_cluster("egress_tunnel", false),
            ],
        },
    });
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    if cfg.transparent_egress {
        listeners.extend([transparent, tls_connect]);
        clusters.extend([
            internal_cluster("tls_connect", "tls_connect"),
            json!({
                "name": "original_dst",
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": "5s",
            }),
        ]);
    }
    if cfg.tls_interception {
        listeners.push(bump);
        clusters.extend([
            internal_cluster("bump_internal", "bump"),
            json!({
                "name": "mandate_sds",
                "type": "STATIC",
                "connect_timeout": "1s",
                // Envoy opens one SDS stream per name it asks for: the
                // default bound (1 024 requests) would stall handshakes
                // beyond it, before the sidecar's own bound.
                "circuit_breakers": {"thresholds": [{"max_requests": 4096}]},
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    },
                },
                "load_assignment": {"cluster_name": "mandate_sds", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"pipe": {"path": sockets.sds}}}}]}]},
            }),
        ]);
    }
    if !listeners.is_empty()
        && let Some(b) = bootstrap.as_object_mut()
    {
        b.insert(
            "bootstrap_extensions".into(),
            json!([{"name": "envoy.bootstrap.internal_listener",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}]),
        );
        // On-demand SDS aborts Envoy on the first intercepted handshake
        // without a node id and cluster (validation passes without them).
        b.insert(
            "node".into(),
            json!({"id": "mandate-agent", "cluster": "mandate-agents"}),
        );
    }
    if let Some(l) = bootstrap
        .pointer_mut("/static_resources/listeners")
        .and_then(Value::as_array_mut)
    {
        l.extend(listeners);
    }
    if let Some(c) = bootstrap
        .pointer_mut("/static_resources/clusters")
        .and_then(Value::as_array_mut)
    {
        c.extend(clusters);
    }
    bootstrap.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_bootstrap_fails_closed() {
        let b: Value = serde_json::from_str(&envoy_bootstrap(&InjectConfig::default())).unwrap();
        let text = b.to_string();
        assert!(text.contains(r#""failure_mode_allow":false"#));
        assert!(text.contains(AUTHZ_SOCKET));
        // The egress listener is on loopback only.
        assert_eq!(
            b["static_resources"]["listeners"][0]["address"]["socket_address"]["address"],
            "127.0.0.1"
        );
        // Admin is a unix socket for Envoy's user alone; no port serves it.
        assert_eq!(
            b["admin"]["address"],
            serde_json::json!({"pipe": {"path": ENVOY_ADMIN_SOCKET, "mode": 0o600}})
        );
        let ports: Vec<&Value> = b["static_resources"]["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l.get("internal_listener").is_none())
            .map(|l| &l["address"]["socket_address"]["port_value"])
            .collect();
        let cfg = InjectConfig::default();
        assert_eq!(
            ports,
            [
                &Value::from(cfg.proxy_port),
                &Value::from(cfg.envoy_health_port),
                &Value::from(cfg.transparent_port)
            ]
        );
        // The transparent listener: loopback (both families), the original
        // destination recovered, every chain decided by the sidecar, each
        // naming its path in metadata the agent cannot set.
        let t = &b["static_resources"]["listeners"][2];
        assert_eq!(t["address"]["socket_address"]["address"], "127.0.0.1");
        assert_eq!(
            t["additional_addresses"][0]["address"]["socket_address"]["address"],
            "::1"
        );
        assert_eq!(t["listener_filters"][0]["name"], "envoy.filters.listener.original_dst");
        let meta = |v: &Value| v["typed_config"]["grpc_service"]["initial_metadata"][0]["value"].clone();
        assert_eq!(meta(&t["default_filter_chain"]["filters"][0]), "raw");
        assert_eq!(
            meta(&t["filter_chains"][1]["filters"][0]["typed_config"]["http_filters"][1]),
            "http"
        );
        assert_eq!(
            t["default_filter_chain"]["filters"][0]["typed_config"]["failure_mode_allow"],
            false
        );
        // Captured TLS becomes a CONNECT to the SNI on the internal listener,
        // with the original destination, decided there (path `sni`).
        let tunnel = &t["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(tunnel["cluster"], "tls_connect");
        assert_eq!(tunnel["tunneling_config"]["hostname"], "%REQUESTED_SERVER_NAME%:443");
        let listener = |name: &str| {
            b["static_resources"]["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["name"] == name)
                .cloned()
                .unwrap()
        };
        let connect = listener("tls_connect");
        let connect_hcm = &connect["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(meta(&connect_hcm["http_filters"][1]), "sni");
        // That listener keeps Envoy's original-destination header, every
        // listener the agent reaches drops it (and the interception mark).
        let dropped = |hcm: &Value| {
            hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["remove"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert!(!dropped(connect_hcm).contains(&ORIGINAL_DST_HEADER.to_string()));
        assert!(dropped(connect_hcm).contains(&TLS_MODE_HEADER.to_string()));
        let proxy_hcm = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        for h in [ORIGINAL_DST_HEADER, TLS_MODE_HEADER] {
            assert!(dropped(proxy_hcm).contains(&h.to_string()), "{h}");
        }
        // Interception: leaves on demand over SDS, each request decided with
        // its TLS session, a node id (Envoy aborts without one).
        let bump = listener("bump");
        let chain = &bump["filter_chains"][0];
        assert_eq!(
            chain["transport_socket"]["typed_config"]["common_tls_context"]["custom_tls_certificate_selector"]["name"],
            "envoy.tls.certificate_selectors.on_demand_secret"
        );
        let inner = &chain["filters"][0]["typed_config"]["http_filters"][1];
        assert_eq!(meta(inner), "intercept");
        assert_eq!(inner["typed_config"]["include_tls_session"], true);
        assert_eq!(inner["typed_config"]["failure_mode_allow"], false);
        assert_eq!(b["node"]["id"], "mandate-agent");
        assert!(text.contains(SDS_SOCKET));
        // Without transparent egress there is no such listener.
        let off = InjectConfig {
            transparent_egress: false,
            ..InjectConfig::default()
        };
        let b: Value = serde_json::from_str(&envoy_bootstrap(&off)).unwrap();
        assert_eq!(b["static_resources"]["listeners"].as_array().unwrap().len(), 3);
        let neither = InjectConfig {
            transparent_egress: false,
            tls_interception: false,
            ..InjectConfig::default()
        };
        let b: Value = serde_json::from_str(&envoy_bootstrap(&neither)).unwrap();
        assert_eq!(b["static_resources"]["listeners"].as_array().unwrap().len(), 2);
        assert!(!b.to_string().contains("bump_internal"));
    }
}
