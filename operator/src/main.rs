//! `mandate-operator`: reconciles Mandate's custom resources.
//!
//! Every replica serves the admin port; one, elected on a Lease, runs the
//! reconcilers. (Admission webhooks, the SPIFFE CA and policy distribution
//! arrive with later issues.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::api::ListParams;
use kube::{Api, Client};
use mandate_operator::admin::{self, AdminState, Metrics, shutdown_signal};
use mandate_operator::controllers::{self, Context};
use mandate_operator::crd::{AgentIdentity, AgentPolicy};
use mandate_operator::leader::{self, Elector};
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
    wait_for_crds(&client, &args.watch_namespace).await;
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
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
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

    tokio::select! {
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
    }
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
