//! The operator's command line: every flag, its environment variable and
//! its default. A module of the library so that code and tests can build
//! an [`Args`] (`Args::parse_from`) without the binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use mandate_identity::workload::IdentitySource;

/// Mandate's operator: compiles and versions AgentPolicies, resolves
/// AgentIdentities, and (as the leader of its replicas) writes their status.
#[derive(Debug, Parser)]
#[command(
    name = "mandate-operator",
    version,
    about = "Mandate's operator: compiles and versions AgentPolicies and resolves AgentIdentities; one replica, elected on a Lease, writes their status"
)]
pub struct Args {
    /// SPIFFE trust domain of this cluster's agents (`spiffe://<trust domain>/...`).
    #[arg(long, env = "MANDATE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Address of the admin port: /livez, /readyz, /metrics.
    #[arg(long, env = "MANDATE_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,

    /// Reconcile only this namespace (default: all namespaces).
    #[arg(long, env = "MANDATE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Namespace of the leader-election Lease (usually the operator's own).
    #[arg(long, env = "MANDATE_LEASE_NAMESPACE", default_value = "mandate-system")]
    pub lease_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, env = "MANDATE_LEASE_NAME", default_value = "mandate-operator")]
    pub lease_name: String,

    /// Seconds a leader's lease lasts without renewal; it renews every third of that.
    #[arg(long, env = "MANDATE_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// This replica's name in the Lease and in events (default: the pod name
    /// from POD_NAME, else the host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,mandate_operator=debug`).
    #[arg(long, env = "MANDATE_LOG", default_value = "info")]
    pub log: String,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "MANDATE_LOG_JSON")]
    pub log_json: bool,

    /// On SIGTERM the replica reports not ready at once (so its Service
    /// stops routing to it), the leader hands its lease over, and admission,
    /// the policy stream and SVID signing go on being served for this many
    /// seconds before it exits: requests already routed here during a
    /// rollout are answered, not dropped (webhooks fail closed).
    #[arg(long, env = "MANDATE_SHUTDOWN_DRAIN_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_drain_seconds: u64,

    /// The operator's own namespace: its generated webhook certificate lives
    /// here, and its pods are never injected.
    #[arg(long, env = "POD_NAMESPACE", default_value = "mandate-system")]
    pub operator_namespace: String,

    /// The operator's Kubernetes user (the only one that may expire
    /// approvals). Default: its service account `mandate-operator`.
    #[arg(long, env = "MANDATE_OPERATOR_USER")]
    pub operator_user: Option<String>,

    /// Address of the admission webhooks (HTTPS).
    #[arg(long, env = "MANDATE_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,

    /// Serve no admission webhooks from this process.
    #[arg(long, env = "MANDATE_NO_WEBHOOKS")]
    pub no_webhooks: bool,

    /// Serve this certificate (a directory with tls.crt, tls.key and
    /// optionally ca.crt, e.g. a mounted cert-manager Secret), re-read when
    /// it changes, instead of generating one.
    #[arg(long, env = "MANDATE_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,

    /// Secret (in the operator's namespace) holding the generated webhook CA
    /// and serving certificate, shared by the replicas.
    #[arg(long, env = "MANDATE_WEBHOOK_SECRET", default_value = "mandate-webhook-tls")]
    pub webhook_secret: String,

    /// DNS names and IP addresses of the generated certificate (default: the
    /// `mandate-webhook` Service's names in the operator's namespace).
    #[arg(long = "webhook-san", env = "MANDATE_WEBHOOK_SANS", value_delimiter = ',')]
    pub webhook_sans: Vec<String>,

    /// MutatingWebhookConfigurations whose caBundle the operator keeps current.
    #[arg(
        long = "mutating-webhook-configuration",
        env = "MANDATE_MUTATING_WEBHOOK_CONFIGURATIONS",
        value_delimiter = ',',
        default_value = "mandate"
    )]
    pub mutating_configurations: Vec<String>,

    /// ValidatingWebhookConfigurations whose caBundle the operator keeps current.
    #[arg(
        long = "validating-webhook-configuration",
        env = "MANDATE_VALIDATING_WEBHOOK_CONFIGURATIONS",
        value_delimiter = ',',
        default_value = "mandate"
    )]
    pub validating_configurations: Vec<String>,

    /// Leave caBundle alone (cert-manager's CA injector writes it).
    #[arg(long, env = "MANDATE_NO_CA_BUNDLE_PATCH")]
    pub no_ca_bundle_patch: bool,

    /// How often to look for a new certificate and repair caBundles, in seconds.
    #[arg(long, env = "MANDATE_WEBHOOK_CERT_RELOAD_SECONDS", default_value_t = 10)]
    pub webhook_cert_reload_seconds: u64,

    /// How often to check Mandate's webhook configurations for drift (a
    /// webhook deleted, set to Ignore, narrowed...), in seconds.
    #[arg(long, env = "MANDATE_WEBHOOK_DRIFT_CHECK_SECONDS", default_value_t = 30)]
    pub webhook_drift_check_seconds: u64,

    /// YAML file of injection settings (images, ports, resources...); see
    /// InjectConfig. Flags below override it.
    #[arg(long, env = "MANDATE_INJECT_CONFIG")]
    pub inject_config: Option<PathBuf>,

    /// Envoy image injected into agent pods.
    #[arg(long, env = "MANDATE_ENVOY_IMAGE")]
    pub envoy_image: Option<String>,

    /// mandate-sidecar image injected into agent pods.
    #[arg(long, env = "MANDATE_SIDECAR_IMAGE")]
    pub sidecar_image: Option<String>,

    /// Inject native sidecars (restartable init containers): `auto` when the
    /// cluster is Kubernetes 1.29 or later.
    #[arg(long, env = "MANDATE_NATIVE_SIDECARS", value_enum, default_value_t = NativeSidecars::Auto)]
    pub native_sidecars: NativeSidecars,

    /// Broker credentials: send sidecars the Secrets (labelled
    /// `mandate.dev/brokered=true`, the only ones the operator watches) and
    /// service-account tokens (TokenRequest, bound to the pod) that their
    /// policies' egress destinations name, and check at admission that
    /// whoever applies such a policy may read them. Off: no Secret is
    /// watched, policies naming credentials are refused, and sidecars are
    /// told brokering is off.
    #[arg(long, env = "MANDATE_CREDENTIAL_BROKERING")]
    pub credential_brokering: bool,

    #[command(flatten)]
    pub spiffe: IdentityArgs,
}

/// Flags of workload identity: the built-in SPIFFE CA and its signing
/// service, or SPIRE; and the policy service.
#[derive(Debug, clap::Args)]
pub struct IdentityArgs {
    /// Where X.509-SVIDs come from. `builtin`: this operator is the trust
    /// domain's CA, signs sidecars' SVIDs after a TokenReview of their pod's
    /// projected token, and presents an SVID of its own CA. `spire`: no CA
    /// and no signing service run here; injected sidecars get the SPIFFE CSI
    /// driver's volume and fetch their SVIDs from the SPIRE agent's Workload
    /// API, and the operator's policy service presents the SVID SPIRE
    /// issues to the operator (--operator-spiffe-id, from
    /// --spiffe-endpoint-socket) and verifies sidecars against SPIRE's
    /// bundle (both kept current as SPIRE rotates them).
    #[arg(long, env = "MANDATE_IDENTITY_SOURCE", value_enum, default_value_t = IdentitySource::Builtin)]
    pub identity_source: IdentitySource,

    /// The SPIFFE Workload API socket (`unix:///path`) of the operator's own
    /// pod, with --identity-source spire.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    pub spiffe_endpoint_socket: Option<String>,

    /// With --identity-source spire: the SPIFFE ID SPIRE issues to the
    /// operator (its registration entry), which sidecars require of the
    /// policy service (default `spiffe://<trust domain>/mandate/operator`).
    #[arg(long, env = "MANDATE_OPERATOR_SPIFFE_ID")]
    pub operator_spiffe_id: Option<String>,

    /// With --identity-source spire: the CSI driver that mounts the
    /// Workload API socket into injected pods.
    #[arg(long, env = "MANDATE_SPIFFE_CSI_DRIVER", default_value = "csi.spiffe.io")]
    pub spiffe_csi_driver: String,

    /// Address of the SVID signing service (gRPC over TLS, the operator's
    /// own SVID as its certificate).
    #[arg(long, env = "MANDATE_IDENTITY_ADDR", default_value = "0.0.0.0:9444")]
    pub identity_addr: SocketAddr,

    /// Run no CA, no signing service and no policy service in this process
    /// (injected sidecars then read policies from ConfigMaps).
    #[arg(long, env = "MANDATE_NO_IDENTITY")]
    pub no_identity: bool,

    /// Secret (in the operator's namespace) holding the CA key and certificate.
    #[arg(long, env = "MANDATE_CA_SECRET", default_value = "mandate-spiffe-ca")]
    pub ca_secret: String,

    /// ConfigMap (key bundle.pem) the trust bundle is published as, in the
    /// operator's namespace and in every enforced namespace.
    #[arg(long, env = "MANDATE_TRUST_BUNDLE_CONFIGMAP", default_value = "mandate-trust-bundle")]
    pub trust_bundle_configmap: String,

    /// Address of the policy service (gRPC over mutual TLS: sidecars present
    /// their SVIDs and receive their agents' policy sets).
    #[arg(long, env = "MANDATE_POLICY_ADDR", default_value = "0.0.0.0:9445")]
    pub policy_addr: SocketAddr,

    /// The policy service's address as injected sidecars reach it (default
    /// `https://mandate-operator.<operator namespace>.svc:<policy port>`).
    #[arg(long, env = "MANDATE_POLICY_SERVER_URL")]
    pub policy_server_url: Option<String>,

    /// The signing service's address as injected sidecars reach it (default
    /// `https://mandate-operator.<operator namespace>.svc:<identity port>`).
    #[arg(long, env = "MANDATE_SVID_SERVER_URL")]
    pub svid_server_url: Option<String>,

    /// DNS names and IPs of the signing service's certificate, beside its
    /// SPIFFE ID (default: the `mandate-operator` Service's names).
    #[arg(long = "identity-san", env = "MANDATE_IDENTITY_SANS", value_delimiter = ',')]
    pub identity_sans: Vec<String>,
}

/// `--native-sidecars`: whether injected sidecars are restartable init containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecars {
    Auto,
    Always,
    Never,
}

impl Args {
    /// Refuse flag combinations the operator cannot run with.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.spiffe.identity_source == IdentitySource::Spire && self.spiffe.spiffe_endpoint_socket.is_none() {
            anyhow::bail!("--identity-source spire needs --spiffe-endpoint-socket (or SPIFFE_ENDPOINT_SOCKET)");
        }
        Ok(())
    }

    /// Refuse a lease too short to renew (checked after logging is set up,
    /// as before the split).
    pub fn check_lease(&self) -> anyhow::Result<()> {
        if self.lease_duration_seconds < 2 {
            anyhow::bail!("--lease-duration-seconds must be at least 2");
        }
        Ok(())
    }

    /// This replica's name in the Lease and in events: `--identity` (the
    /// pod name), else the host name and process id.
    pub fn replica_identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_are_as_documented() {
        let a = Args::try_parse_from(["mandate-operator"]).unwrap();
        assert_eq!(a.trust_domain, "cluster.local");
        assert_eq!(a.admin_addr, "0.0.0.0:9090".parse::<SocketAddr>().unwrap());
        assert_eq!(a.shutdown_drain_seconds, 5);
        assert_eq!(a.mutating_configurations, ["mandate"]);
        assert_eq!(a.native_sidecars, NativeSidecars::Auto);
        assert_eq!(a.spiffe.identity_source, IdentitySource::Builtin);
        assert_eq!(a.spiffe.policy_addr, "0.0.0.0:9445".parse::<SocketAddr>().unwrap());
        assert!(!a.credential_brokering);
        a.check().unwrap();
        a.check_lease().unwrap();
    }

    #[test]
    fn spire_needs_a_socket_and_a_lease_needs_two_seconds() {
        let a = Args::try_parse_from(["mandate-operator", "--identity-source", "spire"]).unwrap();
        assert!(a.check().is_err());
        let a = Args::try_parse_from(["mandate-operator", "--lease-duration-seconds", "1"]).unwrap();
        assert!(a.check_lease().is_err());
        assert!(Args::try_parse_from(["mandate-operator", "--shutdown-drain-seconds", "3601"]).is_err());
    }
}
