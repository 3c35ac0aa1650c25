//! `mandate-sidecar`: serve Envoy's ext_authz Check from AgentPolicy files.
//!
//! Standalone (the embedded default, no cluster needed):
//!   mandate-sidecar --policy policies/ --listen 127.0.0.1:9191 --admin-listen 127.0.0.1:9902

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use mandate_identity::workload::{IdentitySource, WorkloadConfig};
use mandate_policy::engine::{PolicySet, SharedPolicies};
use mandate_sidecar::args::Args;
use mandate_sidecar::decision_log::DecisionLog;
use mandate_sidecar::dns::{DnsConfig, DnsServers};
use mandate_sidecar::input::{Agent, Limits};
use mandate_sidecar::intercept::{InterceptConfig, Interceptor, PodCa, publish_bundle};
use mandate_sidecar::loader::Loader;
use mandate_sidecar::metrics::{self, Metrics};
use mandate_sidecar::sds::Sds;
use mandate_sidecar::server::Authz;
use mandate_sidecar::svid::{Bundle, OperatorTrust, SharedBundle, SharedSvid, SvidConfig};

/// musl's malloc halves the sidecar's throughput; its static build (the
/// images') allocates with mimalloc.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.workers))
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !args.wait_ready.is_empty() {
        return wait_ready(&args.wait_ready, Duration::from_secs(args.wait_timeout_seconds)).await;
    }
    if args.no_tcp && args.listen_unix.is_none() {
        anyhow::bail!("--no-tcp needs --listen-unix: ext_authz must be served somewhere");
    }
    let spire = args.identity_source == IdentitySource::Spire;
    if spire && args.svid_server.is_some() {
        anyhow::bail!(
            "--svid-server is the built-in CA's; with --identity-source spire the SVID comes from the Workload API"
        );
    }
    if spire && args.spiffe_endpoint_socket.is_none() {
        anyhow::bail!("--identity-source spire needs --spiffe-endpoint-socket (or SPIFFE_ENDPOINT_SOCKET)");
    }
    if args.policy_server.is_some() && !spire && args.svid_server.is_none() {
        anyhow::bail!("--policy-server needs an SVID: --svid-server, or --identity-source spire");
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .init();

    // One time limit for every evaluation (regorus' process-wide fallback,
    // which compiled policies use).
    let limit = Duration::from_millis(args.eval_timeout_ms.max(1));
    regorus::utils::limits::set_fallback_execution_timer_config(Some(regorus::utils::limits::ExecutionTimerConfig {
        limit,
        // The clock is read every this many steps (each well under a microsecond).
        check_interval: NonZeroU32::new(32).unwrap_or(NonZeroU32::MIN),
    }));

    let metrics = Arc::new(Metrics::default());
    let policies: SharedPolicies = Arc::new(arc_swap::ArcSwap::from_pointee(PolicySet::default()));
    // gRPC health: the Check service is SERVING only while a policy is loaded.
    let (reporter, health) = tonic_health::server::health_reporter();
    let mut loader = Loader::new(args.policies.clone()).with_engine(args.engine);
    let ready = args.policy_server.is_none() && reload(&mut loader, &policies, &metrics);
    report_health(&reporter, ready).await;
    if args.policy_server.is_none() {
        let policies = policies.clone();
        let metrics = metrics.clone();
        let every = Duration::from_millis(args.reload_interval_ms.max(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let ready = reload(&mut loader, &policies, &metrics);
                report_health(&reporter, ready).await;
            }
        });
    } else {
        // Pushed policies: health follows the set in force.
        let policies = policies.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                report_health(&reporter, !policies.load().policies.is_empty()).await;
            }
        });
    }

    let server_id = args
        .operator_spiffe_id
        .clone()
        .unwrap_or_else(|| format!("spiffe://{}/mandate/operator", args.trust_domain));
    let svid_cfg = args.svid_server.clone().map(|server| SvidConfig {
        server,
        token_file: args.svid_token_file.clone(),
        bundle_file: args.trust_bundle_file.clone(),
        trust_domain: args.trust_domain.clone(),
        server_id: server_id.clone(),
    });
    let on_change = {
        let metrics = metrics.clone();
        move |svid: Option<&mandate_sidecar::svid::Svid>| metrics.svid_held(svid)
    };
    // The SVID (when there is a source) and how the operator is recognised.
    let (svid, trust): (Option<SharedSvid>, Option<OperatorTrust>) = match (&svid_cfg, &args.spiffe_endpoint_socket) {
        (Some(cfg), _) => {
            let shared: SharedSvid = Arc::default();
            metrics.svid_required.store(true, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(mandate_sidecar::svid::keep(cfg.clone(), shared.clone(), on_change));
            let trust = OperatorTrust {
                bundle: Bundle::File(cfg.bundle_file.clone()),
                trust_domain: cfg.trust_domain.clone(),
                server_id: cfg.server_id.clone(),
            };
            (Some(shared), Some(trust))
        }
        (None, Some(endpoint)) if spire => {
            let shared: SharedSvid = Arc::default();
            let bundle: SharedBundle = Arc::default();
            metrics.svid_required.store(true, std::sync::atomic::Ordering::Relaxed);
            let cfg = WorkloadConfig {
                endpoint: endpoint.clone(),
                trust_domain: args.trust_domain.clone(),
                want: args.agent_spiffe_id.clone(),
            };
            tracing::info!(endpoint = %cfg.endpoint, want = ?cfg.want, "X.509-SVID from the SPIFFE Workload API");
            tokio::spawn(mandate_sidecar::svid::keep_from_workload_api(
                cfg,
                args.agent_identity.clone(),
                shared.clone(),
                bundle.clone(),
                on_change,
            ));
            let trust = OperatorTrust {
                bundle: Bundle::WorkloadApi(bundle),
                trust_domain: args.trust_domain.clone(),
                server_id,
            };
            (Some(shared), Some(trust))
        }
        _ => (None, None),
    };

    if let (Some(server), Some(trust), Some(shared)) = (args.policy_server.clone(), trust, svid.clone()) {
        let src = mandate_sidecar::subscribe::PolicySource {
            server,
            pod: args.agent_pod.clone().unwrap_or_default(),
            engine: args.engine,
        };
        tokio::spawn(mandate_sidecar::subscribe::run(
            src,
            trust,
            shared,
            policies.clone(),
            metrics.clone(),
        ));
    }

    let authz = Authz {
        intercept: args.sds_socket.is_some(),
        svid: svid.clone(),
        resolver: Arc::default(),
        policies,
        log: Arc::new(DecisionLog::new(Box::new(std::io::stdout()), &args.redact_headers)),
        metrics: metrics.clone(),
        agent: Agent {
            spiffe_id: args.agent_spiffe_id.clone(),
            identity: args.agent_identity.clone(),
            namespace: args.agent_namespace.clone(),
            pod: args.agent_pod.clone(),
            service_account: args.agent_service_account.clone(),
        },
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            ..Limits::default()
        },
    };

    // The DNS resolver, bound before anything is served: a sidecar whose
    // resolver cannot listen must not start.
    let dns = if args.dns_listen.is_empty() {
        None
    } else {
        let upstreams = if args.dns_upstream.is_empty() {
            let text = std::fs::read_to_string("/etc/resolv.conf")
                .context("--dns-upstream is not given and /etc/resolv.conf cannot be read")?;
            mandate_sidecar::dns::resolv_conf_nameservers(&text)
        } else {
            args.dns_upstream.clone()
        };
        let cfg = DnsConfig {
            listen: args.dns_listen.clone(),
            upstreams,
            cluster_domain: args.dns_cluster_domain.clone(),
            timeout: mandate_sidecar::dns::UPSTREAM_TIMEOUT,
        };
        tracing::info!(upstreams = ?cfg.upstreams, cluster_domain = %cfg.cluster_domain, "DNS resolver: policy hosts and the cluster's names only");
        Some(
            DnsServers::bind(cfg, authz.policies.clone(), metrics.clone())
                .await
                .context("starting the DNS resolver (--dns-listen)")?,
        )
    };

    // TLS interception: the pod CA, published before anything is served (a
    // sidecar that cannot publish it must not start), and its SDS socket.
    let sds = match (&args.sds_socket, &args.ca_bundle_dir) {
        (Some(socket), Some(dir)) => {
            let ca = PodCa::generate(
                args.agent_pod.as_deref(),
                Duration::from_secs(args.ca_lifetime_hours.saturating_mul(3600)),
            )
            .context("TLS interception: the pod CA")?;
            publish_bundle(dir, ca.pem(), &args.system_roots)
                .context("TLS interception: publishing the pod CA (--ca-bundle-dir)")?;
            let cfg = InterceptConfig {
                leaf_lifetime: Duration::from_secs(args.leaf_lifetime_seconds),
                max_names: usize::try_from(args.max_intercepted_names).unwrap_or(usize::MAX),
            };
            let interceptor = Arc::new(Interceptor::new(ca, cfg, authz.policies.clone(), metrics.clone()));
            tokio::spawn(interceptor.clone().run());
            let _ = std::fs::remove_file(socket);
            let uds = tokio::net::UnixListener::bind(socket)
                .with_context(|| format!("binding the SDS socket {} (--sds-socket)", socket.display()))?;
            // Envoy (the owner, or its group) only: the socket hands out
            // private keys the agent's containers trust.
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
                    .with_context(|| format!("chmod {}", socket.display()))?;
            }
            tracing::info!(
                path = %socket.display(),
                bundle = %dir.display(),
                leaf_lifetime_s = args.leaf_lifetime_seconds,
                max_names = args.max_intercepted_names,
                "TLS interception: SDS listening on a unix socket"
            );
            Some((uds, socket.clone(), interceptor))
        }
        _ => None,
    };

    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin_listen))?;
    tracing::info!(addr = %args.admin_listen, "admin listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin, metrics::router(metrics)).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });

    // Room for large requests, so that they are denied with a reason
    // (the body limit) rather than failing at the gRPC layer.
    let service = || AuthorizationServer::new(authz.clone()).max_decoding_message_size(64 * 1024 * 1024);
    // Serves until the ext_authz servers stop (dropping the set ends it).
    let mut dns_tasks = tokio::task::JoinSet::new();
    if let Some(dns) = dns {
        dns.spawn(&mut dns_tasks);
    }
    let mut servers = tokio::task::JoinSet::new();
    if let Some(path) = args.listen_unix.clone() {
        let _ = std::fs::remove_file(&path);
        let uds = tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        let svc = service();
        let health = health.clone();
        tracing::info!(path = %path.display(), "ext_authz listening on a unix socket");
        servers.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(uds);
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, mandate_runtime::shutdown_signal())
                .await
                .with_context(|| format!("serving ext_authz on {}", path.display()))
        });
    }
    if let Some((uds, path, interceptor)) = sds {
        servers.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(uds);
            tonic::transport::Server::builder()
                .add_service(Sds::new(interceptor).server())
                .serve_with_incoming_shutdown(incoming, mandate_runtime::shutdown_signal())
                .await
                .with_context(|| format!("serving SDS on {}", path.display()))
        });
    }
    if !args.no_tcp {
        let addr = args.listen;
        let svc = service();
        tracing::info!(%addr, "ext_authz listening");
        servers.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(svc)
                .serve_with_shutdown(addr, mandate_runtime::shutdown_signal())
                .await
                .with_context(|| format!("serving ext_authz on {addr}"))
        });
    }
    while let Some(done) = servers.join_next().await {
        done.context("an ext_authz server task failed")??;
    }
    dns_tasks.abort_all();
    Ok(())
}

/// Poll plain-HTTP `urls` until each answers 200, or fail at `timeout`.
async fn wait_ready(urls: &[String], timeout: Duration) -> anyhow::Result<()> {
    use http_body_util::Empty;
    let client: hyper_util::client::legacy::Client<_, Empty<hyper::body::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let deadline = tokio::time::Instant::now() + timeout;
    for url in urls {
        let uri: hyper::Uri = url.parse().with_context(|| format!("--wait-ready: bad URL {url}"))?;
        loop {
            let ok = tokio::time::timeout(Duration::from_secs(1), client.get(uri.clone()))
                .await
                .is_ok_and(|r| r.is_ok_and(|r| r.status() == hyper::StatusCode::OK));
            if ok {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("{url} did not answer 200 within {}s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The gRPC health service's view of the Check service.
async fn report_health(reporter: &tonic_health::server::HealthReporter, ready: bool) {
    use tonic_health::ServingStatus;
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for name in ["", "envoy.service.auth.v3.Authorization"] {
        reporter.set_service_status(name, status).await;
    }
}

/// Re-read changed policy files; whether a policy is in force.
fn reload(loader: &mut Loader, policies: &SharedPolicies, metrics: &Metrics) -> bool {
    let (set, errors) = loader.reload();
    for e in &errors {
        metrics.load_errors.inc();
        tracing::error!(file = %e.file.display(), error = %e.message, "policy file not loaded; what it held before stays in force");
    }
    if let Some(set) = set {
        for p in &set.policies {
            tracing::info!(policy = %p.name, version = %p.version, "policy in force");
        }
        metrics.policies_loaded(&set);
        policies.store(Arc::new(set));
    }
    !policies.load().policies.is_empty()
}
