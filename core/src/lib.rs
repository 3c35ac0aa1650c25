//! Mandate's rules as pure functions, with no Kubernetes client and no
//! async runtime: the parts that a security reviewer must trust are written
//! once, here.
//!
//! - [`selector`]: what a label selector matches.
//! - [`binding`]: which AgentIdentity a pod is, and which policies bind it.
//! - [`spiffe_id`]: SPIFFE IDs from templates.
//! - [`version`]: the version of a policy.
//! - [`conditions`]: status conditions.
//! - [`duration`]: SVID lifetimes.

pub mod binding;
pub mod conditions;
pub mod duration;
pub mod selector;
pub mod spiffe_id;
pub mod version;
