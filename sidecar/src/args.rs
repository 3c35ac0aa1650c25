//! The sidecar's command line. Most arguments can also be set in the
//! environment, under the names [`mandate_api::env`] defines: the injector
//! writes a [`mandate_api::env::SidecarEnv`] there, and these read it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use mandate_api::env;
use mandate_identity::workload::IdentitySource;
use mandate_policy::engine::EngineKind;

/// Mandate's sidecar: decides each request Envoy sends to ext_authz against
/// AgentPolicy files, denies on any doubt, and logs every decision (one JSON
/// line each, hash-chained) on stdout. Diagnostics go to stderr.
#[derive(Debug, Parser)]
#[command(name = "mandate-sidecar", version, about, long_about = None)]
pub struct Args {
    /// AgentPolicy YAML files or directories of them (the files you would
    /// `kubectl apply`); re-read when they change.
    #[arg(long = "policy", required_unless_present_any = ["wait_ready", "policy_server"], num_args = 1.., value_delimiter = ',', env = env::MANDATE_POLICY)]
    pub policies: Vec<PathBuf>,

    /// gRPC address for Envoy's ext_authz (keep it on loopback).
    #[arg(long, env = env::MANDATE_LISTEN, default_value = "127.0.0.1:9191")]
    pub listen: SocketAddr,

    /// Also serve ext_authz on this unix socket.
    #[arg(long, env = env::MANDATE_LISTEN_UNIX)]
    pub listen_unix: Option<PathBuf>,

    /// Serve ext_authz on the unix socket only, with no TCP listener.
    #[arg(long, env = env::MANDATE_NO_TCP)]
    pub no_tcp: bool,

    /// Which evaluator runs policies: `auto` uses regorus' bytecode VM for
    /// every policy it can compile and the interpreter for the rest;
    /// `interpreter` always uses the interpreter.
    #[arg(long, env = env::MANDATE_ENGINE, value_enum, default_value_t = EngineKind::Auto)]
    pub engine: EngineKind,

    /// HTTP address for /livez, /readyz and /metrics.
    #[arg(long, env = env::MANDATE_ADMIN_LISTEN, default_value = "127.0.0.1:9902")]
    pub admin_listen: SocketAddr,

    /// Longest a single policy evaluation may run; beyond it the request is denied.
    #[arg(long, env = env::MANDATE_EVAL_TIMEOUT_MS, default_value_t = 50)]
    pub eval_timeout_ms: u64,

    /// Largest request body policy may inspect; larger requests are denied.
    #[arg(long, env = env::MANDATE_MAX_BODY_BYTES, default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// More request headers to redact in the decision log (authorization,
    /// cookie, proxy-authorization and set-cookie always are).
    #[arg(long = "redact-header", env = env::MANDATE_REDACT_HEADERS, value_delimiter = ',')]
    pub redact_headers: Vec<String>,

    /// How often to look for changed policy files, in milliseconds.
    #[arg(long, env = env::MANDATE_RELOAD_INTERVAL_MS, default_value_t = 1000)]
    pub reload_interval_ms: u64,

    /// The agent's SPIFFE ID, shown to policy as input.agent.spiffe_id.
    #[arg(long, env = env::MANDATE_AGENT_SPIFFE_ID)]
    pub agent_spiffe_id: Option<String>,

    /// The agent's AgentIdentity name, shown to policy as input.agent.identity.
    #[arg(long, env = env::MANDATE_AGENT_IDENTITY)]
    pub agent_identity: Option<String>,

    /// The agent pod's namespace (input.agent.namespace).
    #[arg(long, env = env::MANDATE_AGENT_NAMESPACE)]
    pub agent_namespace: Option<String>,

    /// The agent pod's name (input.agent.pod).
    #[arg(long, env = env::MANDATE_AGENT_POD)]
    pub agent_pod: Option<String>,

    /// The agent pod's service account (input.agent.service_account).
    #[arg(long, env = env::MANDATE_AGENT_SERVICE_ACCOUNT)]
    pub agent_service_account: Option<String>,

    /// Do not serve: wait until every one of these URLs answers 200 (e.g.
    /// this sidecar's /readyz and Envoy's readiness), then exit 0; exit 1
    /// after --wait-timeout-seconds. The injected postStart hook uses it so
    /// the agent starts only behind a ready proxy.
    #[arg(long, value_delimiter = ',')]
    pub wait_ready: Vec<String>,

    /// The operator's SVID signing service (`https://host:port`): obtain an
    /// X.509-SVID there at start (not ready before) and keep it renewed; the
    /// agent is then who the SVID says. Without a valid SVID every request
    /// is denied.
    #[arg(long, env = env::MANDATE_SVID_SERVER)]
    pub svid_server: Option<String>,

    /// The pod's projected service-account token for the audience `mandate`
    /// (built-in CA only).
    #[arg(
        long,
        env = env::MANDATE_SVID_TOKEN_FILE,
        default_value = "/var/run/secrets/mandate/token"
    )]
    pub svid_token_file: PathBuf,

    /// PEM trust bundle of the trust domain (built-in CA; with
    /// --identity-source spire the Workload API sends the bundle).
    #[arg(
        long,
        env = env::MANDATE_TRUST_BUNDLE_FILE,
        default_value = "/var/run/mandate-bundle/bundle.pem"
    )]
    pub trust_bundle_file: PathBuf,

    /// The trust domain.
    #[arg(long, env = env::MANDATE_TRUST_DOMAIN, default_value = "cluster.local")]
    pub trust_domain: String,

    /// The SPIFFE ID the operator (signing and policy services) must
    /// present (default `spiffe://<trust domain>/mandate/operator`).
    #[arg(long, env = env::MANDATE_OPERATOR_SPIFFE_ID)]
    pub operator_spiffe_id: Option<String>,

    /// Where the sidecar's X.509-SVID comes from: `builtin` — the
    /// operator's CA, when --svid-server is given (without it the sidecar
    /// runs with no SVID, e.g. standalone); `spire` — the SPIFFE Workload
    /// API at --spiffe-endpoint-socket, which pushes the SVID, its rotations
    /// and the trust bundle (the bundle then also verifies the operator; no
    /// bundle file is read). With `spire` the sidecar is not ready and denies
    /// everything until it holds a valid SVID. An SVID whose SPIFFE ID is
    /// not --agent-spiffe-id (when given) is not taken.
    #[arg(long, env = env::MANDATE_IDENTITY_SOURCE, value_enum, default_value_t = IdentitySource::Builtin)]
    pub identity_source: IdentitySource,

    /// The SPIFFE Workload API socket (`unix:///path`), with
    /// --identity-source spire. The SPIFFE CSI driver mounts the SPIRE
    /// agent's socket into the pod.
    #[arg(long, env = env::SPIFFE_ENDPOINT_SOCKET)]
    pub spiffe_endpoint_socket: Option<String>,

    /// The operator's policy service (`https://host:port`): receive the
    /// policy set bound to this sidecar's agent from there (pushed, over
    /// mutual TLS with the SVID) instead of reading --policy files. Needs an
    /// SVID: --svid-server, or --identity-source spire. Not ready until the
    /// first set arrives.
    #[arg(long, env = env::MANDATE_POLICY_SERVER)]
    pub policy_server: Option<String>,

    /// Threads deciding requests. A sidecar serves one pod: a few threads
    /// keep its memory small whatever the node's core count (one decision
    /// takes microseconds).
    #[arg(long, env = env::MANDATE_WORKERS, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,

    /// How long --wait-ready waits.
    #[arg(long, default_value_t = 120)]
    pub wait_timeout_seconds: u64,

    /// Diagnostics filter (tracing EnvFilter syntax), written to stderr.
    #[arg(long, env = env::MANDATE_LOG, default_value = "info")]
    pub log: String,

    /// Serve DNS (UDP and TCP) on these addresses, comma-separated (e.g.
    /// `127.0.0.1:15053,[::1]:15053`); none when empty. Only names a policy
    /// in force declares as an egress host, and names under
    /// --dns-cluster-domain, are resolved (forwarded to --dns-upstream);
    /// every other name is answered NXDOMAIN and never forwarded. An
    /// address that cannot be bound because its family (IPv6) is off is
    /// skipped; the sidecar does not start unless one binds.
    #[arg(long, env = env::MANDATE_DNS_LISTEN, value_delimiter = ',')]
    pub dns_listen: Vec<SocketAddr>,

    /// The nameservers allowed names are forwarded to, comma-separated
    /// socket addresses, tried in order (default: the `nameserver` lines
    /// of /etc/resolv.conf, port 53).
    #[arg(long, env = env::MANDATE_DNS_UPSTREAM, value_delimiter = ',')]
    pub dns_upstream: Vec<SocketAddr>,

    /// The cluster's DNS domain: names under it (services, pods, and the
    /// search list's expansions of short names) always resolve.
    #[arg(long, env = env::MANDATE_DNS_CLUSTER_DOMAIN, default_value = "cluster.local")]
    pub dns_cluster_domain: String,

    /// TLS interception: serve Envoy's on-demand certificate selector
    /// (SDS, DELTA_GRPC) on this unix socket. Each SNI a policy in force
    /// declares with `tlsMode: Intercept` (and none declares Passthrough)
    /// gets a leaf from the pod's CA, made at start in memory only; every
    /// other name is removed, so its handshake fails. Needs --ca-bundle-dir.
    #[arg(long, env = env::MANDATE_SDS_SOCKET, requires = "ca_bundle_dir")]
    pub sds_socket: Option<PathBuf>,

    /// Where to publish the pod CA for the agent's containers: `ca.crt`
    /// (the pod CA alone) and `bundle.crt` (--system-roots plus the pod
    /// CA), written atomically, mode 0644. The sidecar does not start if it
    /// cannot write them. Needs --sds-socket.
    #[arg(long, env = env::MANDATE_CA_BUNDLE_DIR, requires = "sds_socket")]
    pub ca_bundle_dir: Option<PathBuf>,

    /// The system's trusted roots (PEM), put first in `bundle.crt`.
    #[arg(long, env = env::MANDATE_SYSTEM_ROOTS, default_value = crate::intercept::SYSTEM_ROOTS)]
    pub system_roots: PathBuf,

    /// Lifetime of the pod CA, from the sidecar's start. Leaves never
    /// outlive it; once it has expired no leaf is issued (restart the pod).
    #[arg(long, env = env::MANDATE_CA_LIFETIME_HOURS, default_value_t = 720, value_parser = clap::value_parser!(u64).range(1..=87_600))]
    pub ca_lifetime_hours: u64,

    /// Lifetime of each interception leaf; renewed (pushed again over SDS)
    /// at half-life.
    #[arg(long, env = env::MANDATE_LEAF_LIFETIME_SECONDS, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(10..=31_536_000))]
    pub leaf_lifetime_seconds: u64,

    /// At most this many names hold an interception leaf at once; beyond
    /// it the least recently issued is evicted (removed over SDS: Envoy
    /// asks again at the next handshake for it).
    #[arg(long, env = env::MANDATE_MAX_INTERCEPTED_NAMES, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_intercepted_names: u64,
}
