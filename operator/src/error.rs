//! The operator's one error type.

/// What can go wrong while reconciling (policy compile errors are not here:
/// they are a status, not a failure of the operator).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("building the status patch: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("{0} has no namespace")]
    NotNamespaced(String),
}

impl Error {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "client",
            Error::Serialize(_) => "serialize",
            Error::NotNamespaced(_) => "not_namespaced",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
