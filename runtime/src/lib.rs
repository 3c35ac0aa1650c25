//! What Mandate's binaries (the operator and the sidecar) share at run time:
//! the shutdown signal, the task supervisor, the admin endpoints and tracing
//! setup.

pub mod supervisor;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// Why the runtime could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("--log '{filter}' is not a tracing filter (e.g. info, mandate=debug): {why}")]
    BadLogFilter { filter: String, why: String },
    #[error("binding the admin port {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the admin server stopped: {0}")]
    Serve(std::io::Error),
}

/// Log to stderr at `filter` (an `EnvFilter` directive), as JSON lines when
/// `json`.
pub fn init_tracing(filter: &str, json: bool) -> Result<(), RuntimeError> {
    let env_filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| RuntimeError::BadLogFilter {
        filter: filter.to_string(),
        why: e.to_string(),
    })?;
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(env_filter);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    Ok(())
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// What a binary's admin endpoints report.
pub trait Health: Send + Sync + 'static {
    /// `Ok` when ready to serve; otherwise why not (shown by `/readyz`).
    fn readiness(&self) -> Result<(), &'static str>;
    /// The metrics `/metrics` renders.
    fn registry(&self) -> &Registry;
}

/// A registry in the OpenMetrics text format, as `/metrics` answers it.
pub fn render_metrics(registry: &Registry) -> axum::response::Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n").into_response(),
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz<H: Health>(State(h): State<Arc<H>>) -> axum::response::Response {
    match h.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

async fn metrics<H: Health>(State(h): State<Arc<H>>) -> axum::response::Response {
    render_metrics(h.registry())
}

/// `/livez` (the process answers), `/readyz` ([`Health::readiness`]) and
/// `/metrics`.
pub fn admin_router<H: Health>(health: Arc<H>) -> axum::Router {
    axum::Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz::<H>))
        .route("/metrics", get(metrics::<H>))
        .with_state(health)
}

/// Bind `addr` and serve `router` until the process ends.
pub async fn serve_admin(addr: SocketAddr, router: axum::Router) -> Result<(), RuntimeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RuntimeError::Bind { addr, source })?;
    if let Ok(local) = listener.local_addr() {
        tracing::info!(addr = %local, "admin server listening");
    }
    axum::serve(listener, router).await.map_err(RuntimeError::Serve)
}
