//! Mandate's API, shared by every part: the custom resources' types
//! ([`crd`]), the Kubernetes meta types they embed ([`meta`]), every label,
//! annotation, header and path ([`names`]) and the sidecar's environment
//! contract ([`env`](mod@env): every variable's name, and the
//! [`SidecarEnv`](env::SidecarEnv) the injector writes).
//!
//! Nothing here talks to a cluster. With the `kube` feature (the operator
//! and the CLI), the resources get their `CustomResource` wrappers and
//! `crds` their CRDs.

pub mod crd;
pub mod env;
pub mod meta;
pub mod names;

#[cfg(feature = "kube")]
mod crds;
#[cfg(feature = "kube")]
pub use crds::{crds, crds_yaml};
