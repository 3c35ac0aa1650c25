//! `mandate-operator`: reconciles Mandate's custom resources.
//!
//! Every replica serves the admin port and the admission webhooks; one,
//! elected on a Lease, runs the reconcilers. Every replica also serves the
//! policy stream and, with the built-in CA, the SVID signing service (with
//! SPIRE, SVIDs come from the SPIFFE Workload API instead).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::api::ListParams;
use kube::{Api, Client};
use mandate_api::crd::{AgentIdentity, AgentPolicy};
use mandate_identity::workload::IdentitySource;
use mandate_operator::admin::{self, AdminState, Metrics};
use mandate_operator::controllers::{self, Context};
use mandate_operator::leader::{self, Elector};
use mandate_operator::webhook::{self, WebhookState, inject::InjectConfig, tls};
use mandate_runtime::shutdown_signal;
use tokio::sync::watch;

/// Mandate's operator: compiles and versions AgentPolicies, resolves
/// AgentIdentities, and (as the leader of its replicas) writes their status.
#[derive(Debug, Parser)]
#[command(
    name = "mandate-operator",
    version,
    about = "Mandate's operator: compiles and versions AgentPolicies and resolves AgentIdentities; one replica, elected on a Lease, writes their status"
)]
struct Args {
    /// SPIFFE trust domain of this cluster's agents (`spiffe://<trust domain>/...`).
    #[arg(long, env = "MANDATE_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,

    /// Address of the admin port: /livez, /readyz, /metrics.
    #[arg(long, env = "MANDATE_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: SocketAddr,

    /// Reconcile only this namespace (default: all namespaces).
    #[arg(long, env = "MANDATE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,

    /// Namespace of the leader-election Lease (usually the operator's own).
    #[arg(long, env = "MANDATE_LEASE_NAMESPACE", default_value = "mandate-system")]
    lease_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, env = "MANDATE_LEASE_NAME", default_value = "mandate-operator")]
    lease_name: String,

    /// Seconds a leader's lease lasts without renewal; it renews every third of that.
    #[arg(long, env = "MANDATE_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// This replica's name in the Lease and in events (default: the pod name
    /// from POD_NAME, else the host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,mandate_operator=debug`).
    #[arg(long, env = "MANDATE_LOG", default_value = "info")]
    log: String,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "MANDATE_LOG_JSON")]
    log_json: bool,

    /// On SIGTERM the replica reports not ready at once (so its Service
    /// stops routing to it), the leader hands its lease over, and admission,
    /// the policy stream and SVID signing go on being served for this many
    /// seconds before it exits: requests already routed here during a
    /// rollout are answered, not dropped (webhooks fail closed).
    #[arg(long, env = "MANDATE_SHUTDOWN_DRAIN_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
    shutdown_drain_seconds: u64,

    /// The operator's own namespace: its generated webhook certificate lives
    /// here, and its pods are never injected.
    #[arg(long, env = "POD_NAMESPACE", default_value = "mandate-system")]
    operator_namespace: String,

    /// The operator's Kubernetes user (the only one that may expire
    /// approvals). Default: its service account `mandate-operator`.
    #[arg(long, env = "MANDATE_OPERATOR_USER")]
    operator_user: Option<String>,

    /// Address of the admission webhooks (HTTPS).
    #[arg(long, env = "MANDATE_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    webhook_addr: SocketAddr,

    /// Serve no admission webhooks from this process.
    #[arg(long, env = "MANDATE_NO_WEBHOOKS")]
    no_webhooks: bool,

    /// Serve this certificate (a directory with tls.crt, tls.key and
    /// optionally ca.crt, e.g. a mounted cert-manager Secret), re-read when
    /// it changes, instead of generating one.
    #[arg(long, env = "MANDATE_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<PathBuf>,

    /// Secret (in the operator's namespace) holding the generated webhook CA
    /// and serving certificate, shared by the replicas.
    #[arg(long, env = "MANDATE_WEBHOOK_SECRET", default_value = "mandate-webhook-tls")]
    webhook_secret: String,

    /// DNS names and IP addresses of the generated certificate (default: the
    /// `mandate-webhook` Service's names in the operator's namespace).
    #[arg(long = "webhook-san", env = "MANDATE_WEBHOOK_SANS", value_delimiter = ',')]
    webhook_sans: Vec<String>,

    /// MutatingWebhookConfigurations whose caBundle the operator keeps current.
    #[arg(
        long = "mutating-webhook-configuration",
        env = "MANDATE_MUTATING_WEBHOOK_CONFIGURATIONS",
        value_delimiter = ',',
        default_value = "mandate"
    )]
    mutating_configurations: Vec<String>,

    /// ValidatingWebhookConfigurations whose caBundle the operator keeps current.
    #[arg(
        long = "validating-webhook-configuration",
        env = "MANDATE_VALIDATING_WEBHOOK_CONFIGURATIONS",
        value_delimiter = ',',
        default_value = "mandate"
    )]
    validating_configurations: Vec<String>,

    /// Leave caBundle alone (cert-manager's CA injector writes it).
    #[arg(long, env = "MANDATE_NO_CA_BUNDLE_PATCH")]
    no_ca_bundle_patch: bool,

    /// How often to look for a new certificate and repair caBundles, in seconds.
    #[arg(long, env = "MANDATE_WEBHOOK_CERT_RELOAD_SECONDS", default_value_t = 10)]
    webhook_cert_reload_seconds: u64,

    /// YAML file of injection settings (images, ports, resources...); see
    /// InjectConfig. Flags below override it.
    #[arg(long, env = "MANDATE_INJECT_CONFIG")]
    inject_config: Option<PathBuf>,

    /// Envoy image injected into agent pods.
    #[arg(long, env = "MANDATE_ENVOY_IMAGE")]
    envoy_image: Option<String>,

    /// mandate-sidecar image injected into agent pods.
    #[arg(long, env = "MANDATE_SIDECAR_IMAGE")]
    sidecar_image: Option<String>,

    /// Inject native sidecars (restartable init containers): `auto` when the
    /// cluster is Kubernetes 1.29 or later.
    #[arg(long, env = "MANDATE_NATIVE_SIDECARS", value_enum, default_value_t = NativeSidecars::Auto)]
    native_sidecars: NativeSidecars,

    #[command(flatten)]
    spiffe: IdentityArgs,
}

/// Flags of workload identity: the built-in SPIFFE CA and its signing
/// service, or SPIRE; and the policy service.
#[derive(Debug, clap::Args)]
struct IdentityArgs {
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
    identity_source: IdentitySource,

    /// The SPIFFE Workload API socket (`unix:///path`) of the operator's own
    /// pod, with --identity-source spire.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    spiffe_endpoint_socket: Option<String>,

    /// With --identity-source spire: the SPIFFE ID SPIRE issues to the
    /// operator (its registration entry), which sidecars require of the
    /// policy service (default `spiffe://<trust domain>/mandate/operator`).
    #[arg(long, env = "MANDATE_OPERATOR_SPIFFE_ID")]
    operator_spiffe_id: Option<String>,

    /// With --identity-source spire: the CSI driver that mounts the
    /// Workload API socket into injected pods.
    #[arg(long, env = "MANDATE_SPIFFE_CSI_DRIVER", default_value = "csi.spiffe.io")]
    spiffe_csi_driver: String,

    /// Address of the SVID signing service (gRPC over TLS, the operator's
    /// own SVID as its certificate).
    #[arg(long, env = "MANDATE_IDENTITY_ADDR", default_value = "0.0.0.0:9444")]
    identity_addr: SocketAddr,

    /// Run no CA, no signing service and no policy service in this process
    /// (injected sidecars then read policies from ConfigMaps).
    #[arg(long, env = "MANDATE_NO_IDENTITY")]
    no_identity: bool,

    /// Secret (in the operator's namespace) holding the CA key and certificate.
    #[arg(long, env = "MANDATE_CA_SECRET", default_value = "mandate-spiffe-ca")]
    ca_secret: String,

    /// ConfigMap (key bundle.pem) the trust bundle is published as, in the
    /// operator's namespace and in every enforced namespace.
    #[arg(long, env = "MANDATE_TRUST_BUNDLE_CONFIGMAP", default_value = "mandate-trust-bundle")]
    trust_bundle_configmap: String,

    /// Address of the policy service (gRPC over mutual TLS: sidecars present
    /// their SVIDs and receive their agents' policy sets).
    #[arg(long, env = "MANDATE_POLICY_ADDR", default_value = "0.0.0.0:9445")]
    policy_addr: SocketAddr,

    /// The policy service's address as injected sidecars reach it (default
    /// `https://mandate-operator.<operator namespace>.svc:<policy port>`).
    #[arg(long, env = "MANDATE_POLICY_SERVER_URL")]
    policy_server_url: Option<String>,

    /// The signing service's address as injected sidecars reach it (default
    /// `https://mandate-operator.<operator namespace>.svc:<identity port>`).
    #[arg(long, env = "MANDATE_SVID_SERVER_URL")]
    svid_server_url: Option<String>,

    /// DNS names and IPs of the signing service's certificate, beside its
    /// SPIFFE ID (default: the `mandate-operator` Service's names).
    #[arg(long = "identity-san", env = "MANDATE_IDENTITY_SANS", value_delimiter = ',')]
    identity_sans: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum NativeSidecars {
    Auto,
    Always,
    Never,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.spiffe.identity_source == IdentitySource::Spire && args.spiffe.spiffe_endpoint_socket.is_none() {
        anyhow::bail!("--identity-source spire needs --spiffe-endpoint-socket (or SPIFFE_ENDPOINT_SOCKET)");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?;
    if args.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if args.lease_duration_seconds < 2 {
        anyhow::bail!("--lease-duration-seconds must be at least 2");
    }
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });

    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AdminState {
        metrics: metrics.clone(),
        ready: false.into(),
    });
    let admin = tokio::spawn(admin::serve(args.admin_addr, state.clone()));

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;

    let webhooks_synced = if args.no_webhooks {
        None
    } else {
        Some(start_webhooks(&args, &client, metrics.clone()).await?)
    };
    match (args.spiffe.no_identity, args.spiffe.identity_source) {
        (true, _) => {}
        (false, IdentitySource::Builtin) => start_identity(&args, &client, metrics.clone()).await?,
        (false, IdentitySource::Spire) => start_spire(&args, &client, metrics.clone()).await?,
    }
    wait_for_crds(&client, &args.watch_namespace).await;
    if let Some(synced) = &webhooks_synced {
        // Ready only once the webhooks can tell agent pods from others.
        while !synced.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    state.ready.store(true, Ordering::Relaxed);

    let elector = Elector::new(
        client.clone(),
        leader::Config {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity: identity.clone(),
            lease_duration: Duration::from_secs(args.lease_duration_seconds),
        },
    );
    let (tx, mut rx) = watch::channel(false);
    // One shutdown signal, seen by whoever needs it (tokio wakes every
    // listener of a signal, so there must be exactly one).
    let (stop_tx, stop_rx) = watch::channel(false);
    let drain_until: Arc<std::sync::OnceLock<tokio::time::Instant>> = Arc::default();
    tokio::spawn({
        let state = state.clone();
        let drain_until = drain_until.clone();
        let drain = Duration::from_secs(args.shutdown_drain_seconds);
        async move {
            shutdown_signal().await;
            state.ready.store(false, Ordering::Relaxed);
            let _ = drain_until.set(tokio::time::Instant::now() + drain);
            tracing::info!(
                seconds = drain.as_secs(),
                "stopping: not ready; still serving while the Service drains"
            );
            let _ = stop_tx.send(true);
        }
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let lead = async {
        tokio::select! {
            res = rx.wait_for(|leading| *leading) => { res.context("elector stopped")?; }
            _ = stopped(stop_rx.clone()) => {
                tracing::info!("shutting down before becoming leader");
                return Ok::<bool, anyhow::Error>(false);
            }
        }
        metrics.leader.set(1);
        let ctx = Arc::new(Context::new(
            client.clone(),
            metrics.clone(),
            args.trust_domain.clone(),
            identity.clone(),
        ));
        // The controllers finish their in-flight reconciles and return once stopped.
        controllers::run(ctx, args.watch_namespace.clone(), stopped(stop_rx.clone())).await;
        if !*stop_rx.borrow() {
            anyhow::bail!("the controllers stopped");
        }
        tracing::info!("shutting down");
        Ok(true)
    };

    let res = tokio::select! {
        res = elector.run(tx) => {
            // Lost the lease: stop at once, before another replica starts writing.
            metrics.leader.set(0);
            res
        }
        res = admin => {
            res.context("admin server task")?
        }
        res = lead => {
            metrics.leader.set(0);
            if matches!(res, Ok(true)) {
                // Hand over now rather than make the next leader wait for expiry.
                elector.release().await;
            }
            res.map(|_| ())
        }
    };
    // Stopping on a signal: go on serving until the drain ends.
    if let Some(until) = drain_until.get() {
        tokio::time::sleep_until(*until).await;
        tracing::info!("drained; exiting");
    }
    res
}

/// Serve the admission webhooks (every replica does), with their certificate
/// kept current. Returns the flag that turns true once they can decide.
async fn start_webhooks(
    args: &Args,
    client: &Client,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<std::sync::atomic::AtomicBool>> {
    let mut inject = match &args.inject_config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_yaml::from_str::<InjectConfig>(&text)
                .with_context(|| format!("{} is not a valid injection config", path.display()))?
        }
        None => InjectConfig::default(),
    };
    if let Some(i) = &args.envoy_image {
        inject.envoy_image = i.clone();
    }
    if let Some(i) = &args.sidecar_image {
        inject.sidecar_image = i.clone();
    }
    inject.trust_domain = args.trust_domain.clone();
    if !args.spiffe.no_identity {
        inject.policy_server = Some(args.spiffe.policy_server_url.clone().unwrap_or_else(|| {
            format!(
                "https://mandate-operator.{}.svc:{}",
                args.operator_namespace,
                args.spiffe.policy_addr.port()
            )
        }));
    }
    inject.trust_bundle_configmap = args.spiffe.trust_bundle_configmap.clone();
    inject.identity_source = args.spiffe.identity_source;
    if args.spiffe.identity_source == IdentitySource::Spire {
        inject.spiffe_csi_driver = args.spiffe.spiffe_csi_driver.clone();
        inject.operator_spiffe_id = args.spiffe.operator_spiffe_id.clone();
    } else if !args.spiffe.no_identity {
        inject.svid_server = Some(args.spiffe.svid_server_url.clone().unwrap_or_else(|| {
            format!(
                "https://mandate-operator.{}.svc:{}",
                args.operator_namespace,
                args.spiffe.identity_addr.port()
            )
        }));
    }
    let native_sidecars = match args.native_sidecars {
        NativeSidecars::Always => true,
        NativeSidecars::Never => false,
        NativeSidecars::Auto => {
            let v = client
                .apiserver_version()
                .await
                .context("asking the apiserver for its version")?;
            let minor: u32 = v
                .minor
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap_or(0);
            v.major == "1" && minor >= 29
        }
    };
    tracing::info!(native_sidecars, "sidecar injection mode");

    let source = match &args.webhook_cert_dir {
        Some(dir) => tls::Source::Files(dir.clone()),
        None => {
            let sans = if args.webhook_sans.is_empty() {
                let ns = &args.operator_namespace;
                vec![
                    format!("mandate-webhook.{ns}.svc"),
                    format!("mandate-webhook.{ns}.svc.cluster.local"),
                ]
            } else {
                args.webhook_sans.clone()
            };
            tls::Source::Generated {
                namespace: args.operator_namespace.clone(),
                secret: args.webhook_secret.clone(),
                sans,
            }
        }
    };
    let material = source
        .load(client)
        .await
        .context("obtaining the webhook serving certificate")?;
    let certs = Arc::new(tls::CertStore::new(material).context("the webhook serving certificate")?);
    let ca_bundles = (!args.no_ca_bundle_patch).then(|| {
        (
            args.mutating_configurations.clone(),
            args.validating_configurations.clone(),
        )
    });
    tokio::spawn(tls::keep_current(
        client.clone(),
        source,
        certs.clone(),
        Duration::from_secs(args.webhook_cert_reload_seconds.max(1)),
        ca_bundles,
    ));

    let (identities, namespaces, synced) = webhook::stores(client);
    let state = WebhookState {
        client: client.clone(),
        inject: Arc::new(inject),
        trust_domain: args.trust_domain.clone(),
        operator_namespace: args.operator_namespace.clone(),
        operator_user: args
            .operator_user
            .clone()
            .unwrap_or_else(|| format!("system:serviceaccount:{}:mandate-operator", args.operator_namespace)),
        native_sidecars,
        identities,
        namespaces,
        synced: synced.clone(),
        metrics,
    };
    let app = webhook::router(state);
    let addr = args.webhook_addr;
    tokio::spawn(async move {
        if let Err(e) = webhook::serve(addr, certs, app, std::future::pending()).await {
            tracing::error!(error = %e, "the webhook server stopped");
            std::process::exit(1);
        }
    });
    Ok(synced)
}

/// The built-in SPIFFE CA: load (or make) it, publish its trust bundle,
/// and serve the SVID signing service with the operator's own SVID; keep the
/// CA, that SVID and the published bundles current.
async fn start_identity(args: &Args, client: &Client, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    use mandate_operator::spiffe::{ca::Ca, signer::IdentityService};
    let ns = args.operator_namespace.clone();
    let td = args.trust_domain.clone();
    let id = &args.spiffe;
    let ca = Ca::load_or_create(client, &ns, &id.ca_secret, &td)
        .await
        .context("loading the SPIFFE CA")?;
    ca.publish_bundle(client, &ns, &id.trust_bundle_configmap)
        .await
        .context("publishing the trust bundle")?;
    let sans = if id.identity_sans.is_empty() {
        vec![
            format!("mandate-operator.{ns}.svc"),
            format!("mandate-operator.{ns}.svc.cluster.local"),
        ]
    } else {
        id.identity_sans.clone()
    };
    const OPERATOR_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
    let certs = Arc::new(tls::CertStore::new(ca.operator_svid(&sans, OPERATOR_SVID_TTL)?)?);
    let ca = Arc::new(arc_swap::ArcSwap::from_pointee(ca));
    let service = mandate_proto::identity::v1::identity_server::IdentityServer::new(IdentityService {
        client: client.clone(),
        ca: ca.clone(),
    });
    let app = tonic::service::Routes::new(service).into_axum_router();
    let addr = id.identity_addr;
    let serving = certs.clone();

    // The policy service: every replica, mutual TLS with SVIDs.
    let accept_agents: mandate_identity::verify::Accept = Arc::new(|_| true);
    // The roots follow the CA: after a rotation (reloaded hourly below) the
    // bundle holds the new and the previous CA, so sidecars with SVIDs of
    // either keep their streams.
    let policy_roots: mandate_identity::verify::SharedRoots =
        Arc::new(arc_swap::ArcSwap::from_pointee(ca.load().bundle_der()));
    let verifier =
        mandate_identity::verify::SpiffeVerifier::with_shared_roots(policy_roots.clone(), &td, accept_agents);
    serve_policies(
        client,
        &td,
        metrics,
        id.policy_addr,
        certs.server_config_mtls(verifier)?,
    );
    tokio::spawn(async move {
        if let Err(e) = webhook::serve(addr, serving, app, std::future::pending()).await {
            tracing::error!(error = %e, "the SVID signing service stopped");
            std::process::exit(1);
        }
    });
    // The bundle goes into every enforced namespace, where injected sidecars
    // mount it: at once when a namespace is labelled (or at start), not at
    // the next hourly round.
    {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let (client, ca, cm) = (client.clone(), ca.clone(), id.trust_bundle_configmap.clone());
        let enforced = watcher::Config::default().labels(&format!("{}=true", mandate_api::names::ENFORCE_LABEL));
        tokio::spawn(async move {
            let namespaces =
                Api::<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>>::all(client.clone());
            let mut events = watcher::watcher(namespaces, enforced)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(namespace) => {
                        let Some(target) = namespace.metadata.name else {
                            continue;
                        };
                        if target == "kube-system" {
                            continue; // never Mandate's, labelled or not
                        }
                        if let Err(e) = ca.load().publish_bundle(&client, &target, &cm).await {
                            tracing::warn!(namespace = %target, error = %e, "cannot publish the trust bundle");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watching enforced namespaces for the trust bundle"),
                }
            }
        });
    }
    // Hourly: pick up a rotated CA, renew our own SVID, publish the bundle
    // (into every enforced namespace too).
    let client = client.clone();
    let (secret, cm) = (id.ca_secret.clone(), id.trust_bundle_configmap.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            match Ca::load_or_create(&client, &ns, &secret, &td).await {
                Ok(fresh) => {
                    match fresh.operator_svid(&sans, OPERATOR_SVID_TTL) {
                        Ok(m) => {
                            if let Err(e) = certs.update(m) {
                                tracing::error!(error = %e, "cannot use the renewed operator SVID");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "cannot renew the operator SVID"),
                    }
                    policy_roots.store(Arc::new(fresh.bundle_der()));
                    ca.store(Arc::new(fresh));
                }
                Err(e) => tracing::error!(error = %e, "cannot reload the SPIFFE CA; keeping the current one"),
            }
            let current = ca.load_full();
            let enforced = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
                .list_metadata(&ListParams::default().labels(&format!("{}=true", mandate_api::names::ENFORCE_LABEL)))
                .await;
            let mut targets = vec![ns.clone()];
            match enforced {
                Ok(list) => targets.extend(
                    list.items
                        .into_iter()
                        .filter_map(|n| n.metadata.name)
                        .filter(|n| n != "kube-system" && *n != ns),
                ),
                Err(e) => tracing::warn!(error = %e, "cannot list enforced namespaces for the trust bundle"),
            }
            for target in targets {
                if let Err(e) = current.publish_bundle(&client, &target, &cm).await {
                    tracing::warn!(namespace = %target, error = %e, "cannot publish the trust bundle");
                }
            }
        }
    });
    tracing::info!(%addr, "SVID signing service listening (TLS)");
    Ok(())
}

/// The policy service (`mandate.policy.v1.Policies`) on `addr`, over `mtls`.
fn serve_policies(client: &Client, td: &str, metrics: Arc<Metrics>, addr: SocketAddr, mtls: rustls::ServerConfig) {
    let distributor = mandate_operator::distribute::Distributor::start(client.clone(), td.to_string(), metrics);
    let policy_app = tonic::service::Routes::new(mandate_proto::policy::v1::policies_server::PoliciesServer::new(
        distributor,
    ))
    .into_axum_router();
    tokio::spawn(async move {
        if let Err(e) = webhook::serve_tls(addr, mtls, policy_app, std::future::pending()).await {
            tracing::error!(error = %e, "the policy service stopped");
            std::process::exit(1);
        }
    });
    tracing::info!(%addr, "policy service listening (mutual TLS)");
}

/// SPIRE mode: no CA, no signing service. The operator's own SVID and the
/// trust bundle come from the SPIFFE Workload API (waited for here: the
/// operator is not ready before); the policy service presents that SVID and
/// verifies sidecars against that bundle, both swapped as SPIRE rotates
/// them. Should the SVID expire with no update, the policy service keeps
/// presenting it and sidecars refuse it (they keep their last policy set).
async fn start_spire(args: &Args, client: &Client, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    use mandate_identity::verify::{SharedRoots, SpiffeVerifier};
    use mandate_identity::workload::{self, WorkloadConfig};
    let td = args.trust_domain.clone();
    let own_id = args
        .spiffe
        .operator_spiffe_id
        .clone()
        .unwrap_or_else(|| format!("spiffe://{td}/mandate/operator"));
    let endpoint = args
        .spiffe
        .spiffe_endpoint_socket
        .clone()
        .context("--identity-source spire needs --spiffe-endpoint-socket")?;
    tracing::info!(%endpoint, spiffe_id = %own_id, "SPIRE mode: waiting for the operator's X.509-SVID from the Workload API");
    let mut current = workload::start(WorkloadConfig {
        endpoint,
        trust_domain: td.clone(),
        want: Some(own_id),
    });
    let first = loop {
        if let Some(svid) = current.borrow_and_update().clone() {
            break svid;
        }
        current.changed().await.context("the Workload API watcher stopped")?;
    };
    let certs = Arc::new(tls::CertStore::new(first.material()).context("the operator's SVID from the Workload API")?);
    let roots: SharedRoots = Arc::new(arc_swap::ArcSwap::from_pointee(first.bundle.clone()));
    let verifier = SpiffeVerifier::with_shared_roots(roots.clone(), &td, Arc::new(|_| true));
    serve_policies(
        client,
        &td,
        metrics,
        args.spiffe.policy_addr,
        certs.server_config_mtls(verifier)?,
    );
    tokio::spawn(async move {
        while current.changed().await.is_ok() {
            let now = current.borrow_and_update().clone();
            match now {
                Some(svid) => {
                    roots.store(Arc::new(svid.bundle.clone()));
                    match certs.update(svid.material()) {
                        Ok(_) => tracing::info!(serial = %svid.serial, "the policy service presents the rotated SVID"),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot use the SVID from the Workload API; keeping the current one")
                        }
                    }
                }
                None => tracing::error!(
                    "the operator's SVID expired with no update from the Workload API; sidecars will refuse the policy service until SPIRE issues a new one"
                ),
            }
        }
    });
    Ok(())
}

/// Wait (logging, with growing pauses) until the API answers for Mandate's CRDs.
async fn wait_for_crds(client: &Client, ns: &Option<String>) {
    let mut delay = Duration::from_millis(250);
    loop {
        let (p, i): (Api<AgentPolicy>, Api<AgentIdentity>) = match ns {
            Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let lp = ListParams::default().limit(1);
        match (p.list_metadata(&lp).await, i.list_metadata(&lp).await) {
            (Ok(_), Ok(_)) => return,
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "Mandate's CRDs are not reachable yet (are they installed?); retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
