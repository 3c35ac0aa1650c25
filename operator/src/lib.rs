//! Mandate's operator: its custom resources, and (as they land) the
//! reconcilers, admission webhooks, SPIFFE CA and policy distribution.

pub mod admin;
pub mod args;
pub mod broker;
pub mod controllers;
pub mod distribute;
pub mod error;
pub mod leader;
pub mod lenient;
pub mod posture;
pub mod run;
pub mod secret;
pub mod spiffe;
pub mod webhook;

pub use mandate_api::{crds, crds_yaml};
