//! Helpers for Mandate's tests that need no cluster, in one place:
//!
//! - [`eventually`] and friends ([`wait`]): wait on a condition until a
//!   deadline, failing with a message that names what was awaited (never a
//!   fixed sleep);
//! - [`free_port`] ([`ports`]);
//! - [`agent_policy`] / [`agent_identity`] ([`manifests`]): AgentPolicy and
//!   AgentIdentity manifests, as JSON, as the text `kubectl apply` reads, or
//!   as `mandate_api` types;
//! - [`Process`] ([`process`]): a child process killed when dropped, its
//!   output in a file;
//! - [`binaries`]: where Envoy, OPA and the workspace's own binaries are;
//! - [`http`]: a small HTTP/1.1 client for admin ports and proxies.
//!
//! Helpers that need the test cluster (a kube client, a namespace per test,
//! ServiceAccount tokens) are in `mandate-e2e`, which builds on this crate.
//! Errors are `anyhow::Error`s: they are for a person reading a failed test.

pub mod binaries;
pub mod http;
pub mod manifests;
pub mod ports;
pub mod process;
pub mod wait;

pub use binaries::{envoy, opa, python_clients, workspace_binary};
pub use http::{http_get, http_ok};
pub use manifests::{AgentIdentityBuilder, AgentPolicyBuilder, agent_identity, agent_policy};
pub use ports::{free_port, free_port_on};
pub use process::Process;
pub use wait::{Wait, eventually, eventually_blocking, eventually_some, try_eventually, wait_for};

/// `Duration::from_secs`, shorter to read in deadlines.
pub fn secs(s: u64) -> std::time::Duration {
    std::time::Duration::from_secs(s)
}
