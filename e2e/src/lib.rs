//! Test support for Mandate's cluster tests.
//!
//! A test gets a [`Cluster`] (a kube [`Client`](kube::Client) for the local test
//! cluster that `hack/cluster.sh up` started), a fresh [`TestNamespace`] that is
//! deleted afterwards, and waits that end at a deadline instead of sleeping.
//! When a wait times out, or a test fails or panics, the namespace's pods,
//! events and container logs are printed, so the failure explains itself.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use mandate_e2e::Cluster;
//! let cluster = Cluster::connect().await?;
//! cluster
//!     .with_namespace("example", async |ns| {
//!         // ns.create(pod).await?; ns.wait_pod_running("name", secs(60)).await?;
//!         Ok(())
//!     })
//!     .await
//! # }
//! ```
//!
//! Errors here are for a person reading a failed test, so they are
//! `anyhow::Error`s with context rather than a typed enum.

mod cluster;
mod namespace;
pub mod pods;
mod wait;
pub mod workload_api;

pub use cluster::{Cluster, ClusterInfo, KubectlOutput, Mode, repo_dir};
pub use namespace::TestNamespace;
pub use wait::{Check, wait_until};

/// GET `url` over plain HTTP/1.1; the status and the body. For admin ports
/// (`/readyz`, `/metrics`) of processes a test started.
pub async fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    use anyhow::Context;
    use http_body_util::{BodyExt, Empty};
    let client: hyper_util::client::legacy::Client<_, Empty<hyper::body::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let resp = tokio::time::timeout(secs(5), client.get(uri))
        .await
        .with_context(|| format!("GET {url}: no answer within 5s"))?
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading {url}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `Duration::from_secs`, shorter to read in deadlines.
pub fn secs(s: u64) -> std::time::Duration {
    std::time::Duration::from_secs(s)
}
