//! Backend credentials: what the gateway adds to each upstream request in place of the client's.

use crate::config::{BackendAuthConfig, BackendConfig};
use crate::secret::Secret;

#[derive(Debug)]
pub enum BackendCredential {
    /// Sent as the `api-key` header.
    ApiKey(Secret),
    None,
}

impl BackendCredential {
    /// Resolve from configuration; environment variables were checked by `validate()`.
    pub fn from_config(backend: &BackendConfig) -> Result<Self, String> {
        match &backend.auth {
            BackendAuthConfig::ApiKey { env } => std::env::var(env)
                .map(|key| Self::ApiKey(Secret::new(key)))
                .map_err(|_| format!("environment variable {env} is not set")),
            BackendAuthConfig::None => Ok(Self::None),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::ApiKey(_) => "api-key",
            Self::None => "none",
        }
    }

    /// Add this credential to an upstream request.
    pub fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Self::ApiKey(key) => request.header("api-key", key.expose()),
            Self::None => request,
        }
    }
}
