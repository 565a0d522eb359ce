//! Backend credentials: what the gateway adds to each upstream request in place of the client's.

use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue, header};
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RetryOptions};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};

use crate::config::{BackendAuthConfig, BackendConfig};
use crate::secret::Secret;

/// Entra ID scope of Azure OpenAI (Cognitive Services).
pub const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

#[derive(Debug)]
pub enum BackendCredential {
    /// Sent as the `api-key` header.
    ApiKey(Secret),
    /// Entra ID bearer token; the credential caches it and refreshes it before expiry.
    Entra(Arc<dyn TokenCredential>),
    None,
}

impl BackendCredential {
    /// Resolve from configuration; environment variables were checked by `validate()`.
    pub fn from_config(backend: &BackendConfig) -> Result<Self, String> {
        match &backend.auth {
            BackendAuthConfig::ApiKey { env } => std::env::var(env)
                .map(|key| Self::ApiKey(Secret::new(key)))
                .map_err(|_| format!("environment variable {env} is not set")),
            BackendAuthConfig::ManagedIdentity { client_id } => {
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    // The gateway's own retry loop fails over at once; the SDK's default
                    // backoff would hold a request for up to a minute.
                    client_options: ClientOptions {
                        retry: RetryOptions::none(),
                        ..Default::default()
                    },
                };
                let credential = ManagedIdentityCredential::new(Some(options))
                    .map_err(|e| format!("cannot set up the managed identity credential: {e}"))?;
                Ok(Self::Entra(credential))
            }
            BackendAuthConfig::None => Ok(Self::None),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::ApiKey(_) => "api-key",
            Self::Entra(_) => "managed-identity",
            Self::None => "none",
        }
    }

    /// The header that carries this credential, if any. Fails when no token can be had.
    pub async fn header(&self) -> Result<Option<(HeaderName, HeaderValue)>, String> {
        let (name, value) = match self {
            Self::None => return Ok(None),
            Self::ApiKey(key) => (HeaderName::from_static("api-key"), key.expose().to_owned()),
            Self::Entra(credential) => {
                let token = credential
                    .get_token(&[COGNITIVE_SERVICES_SCOPE], None)
                    .await
                    .map_err(|e| format!("no Entra ID token: {}", e.kind()))?;
                (
                    header::AUTHORIZATION,
                    format!("Bearer {}", token.token.secret()),
                )
            }
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| "credential is not a valid header value".to_string())?;
        value.set_sensitive(true);
        Ok(Some((name, value)))
    }
}
