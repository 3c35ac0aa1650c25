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
//! Waits on anything but a Kubernetes object (a port, a log line, a
//! process's `/readyz`), free ports, AgentPolicy/AgentIdentity builders and
//! child-process guards need no cluster: they are in `mandate-testsupport`
//! (re-exported here as [`testsupport`]).
//!
//! Errors here are for a person reading a failed test, so they are
//! `anyhow::Error`s with context rather than a typed enum.

mod cluster;
mod namespace;
pub mod pods;
mod wait;
pub mod workload_api;

pub use cluster::{Cluster, ClusterInfo, KubectlOutput, Mode, repo_dir};
pub use mandate_testsupport as testsupport;
pub use namespace::TestNamespace;
pub use wait::{Check, wait_until};

// The helpers that need no cluster live in mandate-testsupport; the ones
// these tests always use are here too.
pub use mandate_testsupport::{http_get, secs};
