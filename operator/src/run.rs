//! The operator's start-up and its supervised tasks.
//!
//! Every replica serves the admin port and the admission webhooks; one,
//! elected on a Lease, runs the reconcilers. Every replica also serves the
//! policy stream and, with the built-in CA, the SVID signing service (with
//! SPIRE, SVIDs come from the SPIFFE Workload API instead).
//!
//! Every long-running task runs under one [`Supervisor`]: on SIGTERM, or
//! when a task the operator needs ends, the replica reports not ready at
//! once, the leader hands its lease over, everything goes on serving for
//! `--shutdown-drain-seconds`, and the process stops (non-zero, naming the
//! task, when one failed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use kube::api::ListParams;
use kube::{Api, Client};
use mandate_api::crd::{AgentIdentity, AgentPolicy};
use mandate_identity::workload::IdentitySource;
use mandate_runtime::shutdown_signal;
use mandate_runtime::supervisor::{Stop, Supervisor, Tasks};
use tokio::sync::watch;

use crate::admin::{self, AdminState, Metrics};
use crate::args::{Args, NativeSidecars};
use crate::controllers::{self, Context};
use crate::leader::{self, Elector};
use crate::webhook::{self, WebhookState, inject::InjectConfig, tls};

/// The operator's own SVID (built-in CA) lasts this long; renewed hourly.
const OPERATOR_SVID_TTL: Duration = Duration::from_secs(24 * 3600);

/// Run the operator until SIGTERM (then `Ok`) or until a task it needs
/// ends (then the error names it); either way after the drain.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AdminState {
        metrics: metrics.clone(),
        ready: false.into(),
    });
    // After the drain the leader finishes its reconciles (a policy compile
    // may take COMPILE_DEADLINE) and hands the lease over; past this it is
    // aborted, and the process exits rather than linger serving nothing.
    let graceful_limit = controllers::COMPILE_DEADLINE + Duration::from_secs(args.lease_duration_seconds);
    let supervisor = Supervisor::new(Duration::from_secs(args.shutdown_drain_seconds))
        .graceful_limit(graceful_limit)
        .on_stop({
            let state = state.clone();
            // Not ready at once, so the Service stops routing here.
            move || state.ready.store(false, Ordering::SeqCst)
        });
    let tasks = supervisor.tasks();
    tasks.spawn_fatal("admin server", admin::serve(args.admin_addr, state.clone()));
    let spawner = tasks.clone();
    tasks.spawn_graceful("operator", move |stop| operate(args, spawner, state, stop));
    drop(tasks);
    supervisor.run(shutdown_signal()).await?;
    Ok(())
}

/// Start every replica's services, become ready, then elect and (as the
/// leader) reconcile until stopped.
async fn operate(args: Args, tasks: Tasks, state: Arc<AdminState>, stop: Stop) -> anyhow::Result<()> {
    let client = tokio::select! {
        started = start(&args, &tasks, &state) => started?,
        () = stop.clone().stopped() => {
            tracing::info!("shutting down before start-up finished");
            return Ok(());
        }
    };
    if stop.is_stopped() {
        // Stopped while becoming ready: the stop hook may have run first.
        state.ready.store(false, Ordering::SeqCst);
        return Ok(());
    }
    lead(&args, client, state.metrics.clone(), stop).await
}

/// Connect, start the webhooks and the identity services, and report ready
/// once Mandate's CRDs answer and the webhooks can decide.
async fn start(args: &Args, tasks: &Tasks, state: &AdminState) -> anyhow::Result<Client> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
    let metrics = state.metrics.clone();
    let webhooks_synced = if args.no_webhooks {
        None
    } else {
        Some(start_webhooks(args, &client, metrics.clone(), tasks).await?)
    };
    match (args.spiffe.no_identity, args.spiffe.identity_source) {
        (true, _) => {}
        (false, IdentitySource::Builtin) => start_identity(args, &client, metrics, tasks).await?,
        (false, IdentitySource::Spire) => start_spire(args, &client, metrics, tasks).await?,
    }
    wait_for_crds(&client, &args.watch_namespace).await;
    if let Some(synced) = &webhooks_synced {
        // Ready only once the webhooks can tell agent pods from others.
        while !synced.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    state.ready.store(true, Ordering::SeqCst);
    Ok(client)
}

/// Elect on the Lease; as the leader, run the reconcilers until stopped,
/// then hand the lease over. Losing the lease stops the reconcilers at once
/// (before another replica starts writing) and is an error.
async fn lead(args: &Args, client: Client, metrics: Arc<Metrics>, stop: Stop) -> anyhow::Result<()> {
    let identity = args.replica_identity();
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
    let leading = async {
        tokio::select! {
            res = rx.wait_for(|leading| *leading) => { res.context("elector stopped")?; }
            () = stop.clone().stopped() => {
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
        controllers::run(ctx, args.watch_namespace.clone(), stop.clone().stopped()).await;
        if !stop.is_stopped() {
            anyhow::bail!("the controllers stopped");
        }
        tracing::info!("shutting down");
        Ok(true)
    };
    tokio::select! {
        res = elector.run(tx) => {
            // Lost the lease: stop at once, before another replica starts writing.
            metrics.leader.set(0);
            res
        }
        res = leading => {
            metrics.leader.set(0);
            if matches!(res, Ok(true)) {
                // Hand over now rather than make the next leader wait for expiry.
                elector.release().await;
            }
            res.map(|_| ())
        }
    }
}

/// The injection settings: `--inject-config`, then the flags over it.
fn inject_config(args: &Args) -> anyhow::Result<InjectConfig> {
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
    Ok(inject)
}

/// Whether to inject native sidecars: `--native-sidecars`, asking the
/// apiserver's version for `auto` (1.29 or later).
async fn native_sidecars(args: &Args, client: &Client) -> anyhow::Result<bool> {
    Ok(match args.native_sidecars {
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
    })
}

/// Where the webhook serving certificate comes from: `--webhook-cert-dir`,
/// else generated into `--webhook-secret`.
fn webhook_cert_source(args: &Args) -> tls::Source {
    match &args.webhook_cert_dir {
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
    }
}

/// Serve the admission webhooks (every replica does), with their certificate
/// kept current. Returns the flag that turns true once they can decide.
pub async fn start_webhooks(
    args: &Args,
    client: &Client,
    metrics: Arc<Metrics>,
    tasks: &Tasks,
) -> anyhow::Result<Arc<AtomicBool>> {
    let inject = inject_config(args)?;
    let native_sidecars = native_sidecars(args, client).await?;
    tracing::info!(native_sidecars, "sidecar injection mode");

    let source = webhook_cert_source(args);
    let material = source
        .load(client)
        .await
        .context("obtaining the webhook serving certificate")?;
    let certs = Arc::new(tls::CertStore::new(material).context("the webhook serving certificate")?);
    let ca_bundles = (!args.no_ca_bundle_patch).then(|| tls::CaBundleTargets {
        mutating: args.mutating_configurations.clone(),
        validating: args.validating_configurations.clone(),
    });
    tasks.spawn_background(
        "webhook certificate reloader",
        tls::keep_current(
            client.clone(),
            source,
            certs.clone(),
            Duration::from_secs(args.webhook_cert_reload_seconds.max(1)),
            ca_bundles,
        ),
    );

    let (identities, namespaces, synced) = webhook::stores(client);
    tasks.spawn_background(
        "webhook drift watch",
        webhook::drift::DriftWatch {
            client: client.clone(),
            mutating: args.mutating_configurations.clone(),
            validating: args.validating_configurations.clone(),
            namespaces: namespaces.clone(),
            watch_namespace: args.watch_namespace.clone(),
            operator_namespace: args.operator_namespace.clone(),
            metrics: metrics.clone(),
            recorder: kube::runtime::events::Recorder::new(
                client.clone(),
                kube::runtime::events::Reporter {
                    controller: crate::controllers::MANAGER.into(),
                    instance: Some(args.replica_identity()),
                },
            ),
            every: Duration::from_secs(args.webhook_drift_check_seconds.max(1)),
        }
        .run(),
    );
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
        credential_brokering: args.credential_brokering,
        identities,
        namespaces,
        synced: synced.clone(),
        metrics,
    };
    let app = webhook::router(state);
    let addr = args.webhook_addr;
    tasks.spawn_fatal("webhook server", async move {
        webhook::serve(addr, certs, app, std::future::pending())
            .await
            .context("the webhook server stopped")
    });
    Ok(synced)
}

/// The DNS names of the operator's own SVID: `--identity-san`, else the
/// `mandate-operator` Service's names.
fn identity_sans(args: &Args) -> Vec<String> {
    let ns = &args.operator_namespace;
    if args.spiffe.identity_sans.is_empty() {
        vec![
            format!("mandate-operator.{ns}.svc"),
            format!("mandate-operator.{ns}.svc.cluster.local"),
        ]
    } else {
        args.spiffe.identity_sans.clone()
    }
}

/// The built-in SPIFFE CA: load (or make) it, publish its trust bundle,
/// and serve the SVID signing service with the operator's own SVID; keep the
/// CA, that SVID and the published bundles current.
pub async fn start_identity(args: &Args, client: &Client, metrics: Arc<Metrics>, tasks: &Tasks) -> anyhow::Result<()> {
    use crate::spiffe::{ca::Ca, signer::IdentityService};
    let ns = args.operator_namespace.clone();
    let td = args.trust_domain.clone();
    let id = &args.spiffe;
    let ca = Ca::load_or_create(client, &ns, &id.ca_secret, &td)
        .await
        .context("loading the SPIFFE CA")?;
    ca.publish_bundle(client, &ns, &id.trust_bundle_configmap)
        .await
        .context("publishing the trust bundle")?;
    let sans = identity_sans(args);
    let certs = Arc::new(tls::CertStore::new(ca.operator_svid(&sans, OPERATOR_SVID_TTL)?)?);
    let ca = Arc::new(arc_swap::ArcSwap::from_pointee(ca));
    let service = mandate_proto::identity::v1::identity_server::IdentityServer::new(IdentityService {
        client: client.clone(),
        ca: ca.clone(),
        operator_namespace: ns.clone(),
        inject: Arc::new(inject_config(args)?),
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
        tasks,
        args.credential_brokering,
    );
    tasks.spawn_fatal("SVID signing service", async move {
        webhook::serve(addr, serving, app, std::future::pending())
            .await
            .context("the SVID signing service stopped")
    });
    // The bundle goes into every enforced namespace, where injected sidecars
    // mount it: at once when a namespace is labelled (or at start), not at
    // the next hourly round.
    tasks.spawn_background(
        "trust bundle publisher",
        publish_bundle_on_enforce(client.clone(), ca.clone(), id.trust_bundle_configmap.clone()),
    );
    // Hourly: pick up a rotated CA, renew our own SVID, publish the bundle
    // (into every enforced namespace too).
    tasks.spawn_background(
        "SPIFFE CA reloader",
        reload_ca_hourly(ReloadCa {
            client: client.clone(),
            namespace: ns,
            secret: id.ca_secret.clone(),
            configmap: id.trust_bundle_configmap.clone(),
            trust_domain: td,
            sans,
            certs,
            policy_roots,
            ca,
        }),
    );
    tracing::info!(%addr, "SVID signing service listening (TLS)");
    Ok(())
}

type SharedCa = Arc<arc_swap::ArcSwap<crate::spiffe::ca::Ca>>;

/// Publish the trust bundle into each namespace as it is labelled for
/// enforcement (and into every such namespace at start).
async fn publish_bundle_on_enforce(client: Client, ca: SharedCa, cm: String) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let enforced = watcher::Config::default().labels(&format!("{}=true", mandate_api::names::ENFORCE_LABEL));
    let namespaces = Api::<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>>::all(client.clone());
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
}

/// What the hourly CA round reads and keeps current.
struct ReloadCa {
    client: Client,
    namespace: String,
    secret: String,
    configmap: String,
    trust_domain: String,
    sans: Vec<String>,
    certs: Arc<tls::CertStore>,
    policy_roots: mandate_identity::verify::SharedRoots,
    ca: SharedCa,
}

/// Hourly: pick up a rotated CA, renew the operator's SVID, publish the
/// bundle into the operator's namespace and every enforced one.
async fn reload_ca_hourly(r: ReloadCa) {
    use crate::spiffe::ca::Ca;
    let ReloadCa {
        client,
        namespace: ns,
        secret,
        configmap: cm,
        trust_domain: td,
        sans,
        certs,
        policy_roots,
        ca,
    } = r;
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
}

/// The policy service (`mandate.policy.v1.Policies`) on `addr`, over
/// `mtls`; with `brokering`, it sends brokered credentials.
fn serve_policies(
    client: &Client,
    td: &str,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    mtls: rustls::ServerConfig,
    tasks: &Tasks,
    brokering: bool,
) {
    let distributor = crate::distribute::Distributor::start(client.clone(), td.to_string(), metrics, brokering);
    let policy_app = tonic::service::Routes::new(mandate_proto::policy::v1::policies_server::PoliciesServer::new(
        distributor,
    ))
    .into_axum_router();
    tasks.spawn_fatal("policy service", async move {
        webhook::serve_tls(addr, mtls, policy_app, std::future::pending())
            .await
            .context("the policy service stopped")
    });
    tracing::info!(%addr, "policy service listening (mutual TLS)");
}

/// SPIRE mode: no CA, no signing service. The operator's own SVID and the
/// trust bundle come from the SPIFFE Workload API (waited for here: the
/// operator is not ready before); the policy service presents that SVID and
/// verifies sidecars against that bundle, both swapped as SPIRE rotates
/// them. Should the SVID expire with no update, the policy service keeps
/// presenting it and sidecars refuse it (they keep their last policy set).
pub async fn start_spire(args: &Args, client: &Client, metrics: Arc<Metrics>, tasks: &Tasks) -> anyhow::Result<()> {
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
        tasks,
        args.credential_brokering,
    );
    tasks.spawn_background("SVID rotation (Workload API)", async move {
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
pub async fn wait_for_crds(client: &Client, ns: &Option<String>) {
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
