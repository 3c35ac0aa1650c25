//! Mandate's policy engine, with no Kubernetes and no async runtime.
//!
//! - [`check`]: what makes an AgentPolicy acceptable (it compiles, its
//!   entrypoint is a rule, it is within the limits, its tests pass). The
//!   admission webhook, the reconciler, the sidecar and `mandate test` all
//!   apply these same checks.
//! - [`credential`]: brokered credentials, as policies declare them and
//!   the operator supplies them (their values never print).
//! - [`engine`]: policies compiled once per version, and the deny-wins
//!   decision over every policy bound to an agent.

pub mod check;
pub mod credential;
pub mod engine;

pub use check::{Compiled, PolicyError, TestReport, compile, run_tests, version};
