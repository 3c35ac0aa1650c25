//! `mandate-sidecar`: Envoy's ext_authz decision engine for one agent pod.
//!
//! Builds an OPA-Envoy-compatible input document from each CheckRequest,
//! evaluates every bound AgentPolicy with regorus (compiled once per
//! version), denies on any doubt, and writes a hash-chained decision log.

pub mod args;
pub mod broker;
pub mod decision_log;
pub mod dns;
pub mod egress;
pub mod egress_rules;
pub mod input;
pub mod intercept;
pub mod loader;
pub mod metrics;
pub mod sds;
pub mod server;
pub mod subscribe;
pub mod svid;
