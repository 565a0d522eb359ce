//! Backend credentials: what the gateway adds to each upstream request in place of the client's.
//!
//! Entra ID tokens come from `azure_identity` (managed identity, AKS workload identity, or the
//! developer's Azure CLI login) through [`EntraToken`], which keeps the token, refreshes it
//! before it expires with one refresh in flight, and is shared by every backend configured
//! with the same identity.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, header};
use azure_core::credentials::{AccessToken, TokenCredential};
use azure_core::http::{ClientOptions, RetryOptions};
use azure_core::time::OffsetDateTime;
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientAssertionCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};

use crate::auth::secret::Secret;
use crate::config::{BackendAuthConfig, BackendConfig};

/// Entra ID scope of Azure OpenAI (Cognitive Services).
pub const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// A token is refreshed once it has less than this left: by one request, while the others
/// go on with it.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// Closer than this to its expiry, a token is not sent: requests wait for the refresh.
const MIN_TOKEN_LIFE: Duration = Duration::from_secs(10);
/// A usable token is not refreshed again sooner than this (an identity endpoint issuing
/// short-lived tokens must not be asked on every request).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub enum BackendCredential {
    /// Sent as the `api-key` header.
    ApiKey(Secret),
    /// Entra ID bearer token.
    Entra(Arc<EntraToken>),
    None,
}

/// Credentials built so far, by identity, so backends sharing one share its token.
#[derive(Default)]
pub struct SharedCredentials(HashMap<String, Arc<EntraToken>>);

impl BackendCredential {
    /// Resolve from configuration; environment variables were checked by `validate()`.
    pub fn from_config(
        backend: &BackendConfig,
        shared: &mut SharedCredentials,
    ) -> Result<Self, String> {
        let identity = format!("{:?}", backend.auth);
        if let Some(token) = shared.0.get(&identity) {
            return Ok(Self::Entra(token.clone()));
        }
        let (kind, credential): (&'static str, Arc<dyn TokenCredential>) = match &backend.auth {
            BackendAuthConfig::ApiKey { env } => {
                return std::env::var(env)
                    .map(|key| Self::ApiKey(Secret::new(key)))
                    .map_err(|_| format!("environment variable {env} is not set"));
            }
            BackendAuthConfig::None => return Ok(Self::None),
            BackendAuthConfig::ManagedIdentity { client_id } => {
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options: no_sdk_retries(),
                };
                let credential = ManagedIdentityCredential::new(Some(options))
                    .map_err(|e| format!("cannot set up the managed identity credential: {e}"))?;
                ("managed-identity", credential)
            }
            BackendAuthConfig::WorkloadIdentity {
                client_id,
                tenant_id,
                token_file,
            } => {
                let options = WorkloadIdentityCredentialOptions {
                    credential_options: ClientAssertionCredentialOptions {
                        client_options: no_sdk_retries(),
                    },
                    client_id: client_id.clone(),
                    tenant_id: tenant_id.clone(),
                    token_file_path: token_file.clone(),
                };
                let credential = WorkloadIdentityCredential::new(Some(options))
                    .map_err(|e| format!("cannot set up the workload identity credential: {e}"))?;
                ("workload-identity", credential)
            }
            BackendAuthConfig::AzureCli { tenant_id } => {
                let options = AzureCliCredentialOptions {
                    tenant_id: tenant_id.clone(),
                    ..Default::default()
                };
                let credential = AzureCliCredential::new(Some(options))
                    .map_err(|e| format!("cannot set up the Azure CLI credential: {e}"))?;
                ("azure-cli", credential)
            }
        };
        let token = Arc::new(EntraToken::new(kind, credential));
        shared.0.insert(identity, token.clone());
        Ok(Self::Entra(token))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::ApiKey(_) => "api-key",
            Self::Entra(token) => token.kind,
            Self::None => "none",
        }
    }

    /// The header that carries this credential, if any. Fails when no token can be had.
    pub async fn header(&self) -> Result<Option<(HeaderName, HeaderValue)>, String> {
        let (name, value) = match self {
            Self::None => return Ok(None),
            Self::ApiKey(key) => (HeaderName::from_static("api-key"), key.expose().to_owned()),
            Self::Entra(token) => (
                header::AUTHORIZATION,
                format!("Bearer {}", token.get().await?.token.secret()),
            ),
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| "credential is not a valid header value".to_string())?;
        value.set_sensitive(true);
        Ok(Some((name, value)))
    }
}

/// The gateway's own retry loop fails over at once; the SDK's default backoff would hold a
/// request for up to a minute.
fn no_sdk_retries() -> ClientOptions {
    ClientOptions {
        retry: RetryOptions::none(),
        ..Default::default()
    }
}

/// One identity's Entra ID token for Azure OpenAI, cached and refreshed before it expires.
pub struct EntraToken {
    kind: &'static str,
    credential: Arc<dyn TokenCredential>,
    current: RwLock<Option<AccessToken>>,
    /// Held by the one request refreshing the token; when the last refresh happened.
    refreshing: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl std::fmt::Debug for EntraToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntraToken")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl EntraToken {
    pub fn new(kind: &'static str, credential: Arc<dyn TokenCredential>) -> Self {
        Self {
            kind,
            credential,
            current: RwLock::new(None),
            refreshing: tokio::sync::Mutex::new(None),
        }
    }

    /// A token with time left: the cached one, or a fresh one. When the cached one is due
    /// for refresh but still usable, one caller refreshes and the others use it meanwhile.
    pub async fn get(&self) -> Result<AccessToken, String> {
        let now = OffsetDateTime::now_utc();
        let cached = self.current.read().expect("token lock").clone();
        if let Some(token) = &cached {
            let left = token.expires_on - now;
            if left > REFRESH_BEFORE_EXPIRY {
                return Ok(token.clone());
            }
            if left > MIN_TOKEN_LIFE {
                return match self.refreshing.try_lock() {
                    Ok(last) if last.is_some_and(|at| at.elapsed() < MIN_REFRESH_INTERVAL) => {
                        Ok(token.clone())
                    }
                    Ok(mut last) => self.refresh(&mut last).await.or(Ok(token.clone())),
                    Err(_) => Ok(token.clone()), // being refreshed
                };
            }
        }
        let mut last = self.refreshing.lock().await;
        // Refreshed while this request waited?
        if let Some(token) = self.current.read().expect("token lock").clone()
            && token.expires_on - OffsetDateTime::now_utc() > MIN_TOKEN_LIFE
            && cached
                .as_ref()
                .is_none_or(|old| old.expires_on != token.expires_on)
        {
            return Ok(token);
        }
        self.refresh(&mut last).await
    }

    async fn refresh(
        &self,
        last: &mut Option<tokio::time::Instant>,
    ) -> Result<AccessToken, String> {
        *last = Some(tokio::time::Instant::now());
        let token = self
            .credential
            .get_token(&[COGNITIVE_SERVICES_SCOPE], None)
            .await
            .map_err(|e| format!("no Entra ID token ({}): {}", self.kind, e.kind()))?;
        *self.current.write().expect("token lock") = Some(token.clone());
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::credentials::{Secret as TokenSecret, TokenRequestOptions};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Hands out tokens living `life`, counting calls; slow, so concurrent callers overlap.
    #[derive(Debug)]
    struct Issuer {
        calls: AtomicU32,
        life: azure_core::time::Duration,
    }

    #[async_trait::async_trait]
    impl TokenCredential for Issuer {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(AccessToken::new(
                TokenSecret::new(format!("token-{n}")),
                OffsetDateTime::now_utc() + self.life,
            ))
        }
    }

    fn token(life: azure_core::time::Duration) -> (Arc<Issuer>, Arc<EntraToken>) {
        let issuer = Arc::new(Issuer {
            calls: AtomicU32::new(0),
            life,
        });
        (issuer.clone(), Arc::new(EntraToken::new("test", issuer)))
    }

    async fn get_concurrently(token: &Arc<EntraToken>, n: usize) -> Vec<String> {
        let calls = (0..n).map(|_| {
            let token = token.clone();
            tokio::spawn(async move { token.get().await.unwrap().token.secret().to_owned() })
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_requests_cause_one_fetch() {
        let (issuer, token) = token(azure_core::time::Duration::hours(1));
        let got = get_concurrently(&token, 20).await;
        assert!(got.iter().all(|t| t == "token-1"), "{got:?}");
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 1);
        token.get().await.unwrap();
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 1, "cached");
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_near_expiry_is_refreshed_once_while_it_still_serves() {
        // Tokens living 2 minutes are always within the refresh window.
        let (issuer, token) = token(azure_core::time::Duration::minutes(2));
        token.get().await.unwrap();
        let got = get_concurrently(&token, 20).await;
        assert!(
            got.iter().all(|t| t == "token-1"),
            "just fetched: not again so soon"
        );
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(MIN_REFRESH_INTERVAL).await;
        let got = get_concurrently(&token, 20).await;
        // One caller refreshed; the others were served the old token meanwhile.
        assert_eq!(issuer.calls.load(Ordering::SeqCst), 2);
        assert!(
            got.iter().all(|t| t == "token-1" || t == "token-2"),
            "{got:?}"
        );
        assert!(
            got.iter().any(|t| t == "token-1"),
            "nobody waited for the refresh"
        );
    }
}
