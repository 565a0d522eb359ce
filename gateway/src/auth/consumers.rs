//! Client authentication: which consumer sent this request, by its key or its Entra ID
//! token. Only SHA-256 hashes of the keys are held: a presented key is hashed and compared,
//! in constant time, with every consumer's hash. A bearer token shaped like a JWT is checked
//! as one when `[auth.jwt]` is configured ([`crate::auth::entra_clients`]).

use std::collections::HashMap;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::debug;

use crate::auth::entra_clients::JwtVerifier;
use crate::config::quota_period::QuotaPeriod;
use crate::config::{ConsumerConfig, JwtConfig};
use crate::error::GatewayError;

/// A key's SHA-256.
type KeyHash = [u8; 32];

/// The configured consumers. With none, access is open (a warning is logged at start).
#[derive(Default)]
pub struct Consumers {
    /// Every consumer, with its key's hash when it has a key.
    keys: Vec<(Consumer, Option<KeyHash>)>,
    /// Entra ID clients: application id → index in `keys`.
    clients: HashMap<String, usize>,
    jwt: Option<JwtVerifier>,
}

/// The SHA-256 of a key, in hex: what `key_sha256` holds (`spillway hash-key`).
pub fn key_sha256_hex(key: &str) -> String {
    hex::encode(hash(key))
}

/// The tag stored responses carry for their creator: a hash of the consumer's name (its
/// name is not written to the fleet state), compared on every later use of the response.
pub fn owner_tag(consumer: &str) -> String {
    let digest = Sha256::digest(format!("spillway-response-owner\0{consumer}").as_bytes());
    hex::encode(&digest[..16])
}

fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Who sent a request, and where its requests may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    pub name: String,
    /// Data residency: only members in these regions.
    pub regions: Option<Vec<String>>,
    /// The only pools it may use.
    pub pools: Option<Vec<String>>,
    pub max_prompt_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    /// Fleet-wide budget per window.
    pub tpm: Option<u64>,
    pub rpm: Option<u64>,
    /// Fleet-wide tokens per calendar period.
    pub token_quota: Option<(u64, QuotaPeriod)>,
    /// Spending limit per period, in micro-USD.
    pub max_spend: Option<(u64, QuotaPeriod)>,
    /// Its traffic class (`None`: the highest-ranked).
    pub class: Option<String>,
    /// `false`: its budgets and quota are in shadow mode (counted, never refused).
    pub enforce: bool,
}

impl Consumer {
    pub fn may_use(&self, pool: &str) -> bool {
        self.pools
            .as_ref()
            .is_none_or(|pools| pools.iter().any(|p| p == pool))
    }
}

impl Consumers {
    pub fn from_config(
        consumers: &[ConsumerConfig],
        jwt: Option<&JwtConfig>,
    ) -> Result<Self, String> {
        let keys = consumers
            .iter()
            .map(|c| {
                let consumer = Consumer {
                    name: c.name.clone(),
                    regions: c.regions.clone(),
                    pools: c.pools.clone(),
                    max_prompt_tokens: c.max_prompt_tokens,
                    max_tokens: c.max_tokens,
                    tpm: c.tpm,
                    rpm: c.rpm,
                    token_quota: c
                        .token_quota
                        .map(|quota| (quota, c.token_quota_period.unwrap_or_default())),
                    max_spend: c.max_spend_usd.map(|usd| {
                        let micro = (usd * 1e6).round() as u64;
                        (micro, c.max_spend_period.unwrap_or_default())
                    }),
                    class: c.class.clone(),
                    enforce: c.enforce.unwrap_or(true),
                };
                Ok((consumer, key_hash_of(c)?))
            })
            .collect::<Result<_, String>>()?;
        let clients = consumers
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.client_id.clone().map(|id| (id, i)))
            .collect();
        let jwt = jwt
            .map(JwtVerifier::from_config)
            .transpose()
            .map_err(|e| format!("auth.jwt: {e}"))?;
        Ok(Self { keys, clients, jwt })
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty() && self.jwt.is_none()
    }

    /// The consumer, `None` when access is open, or 401 (the same for every reason).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<&Consumer>, GatewayError> {
        if self.is_open() {
            return Ok(None);
        }
        let presented = client_key(headers).ok_or(GatewayError::Unauthorized)?;
        if let Some(jwt) = &self.jwt
            && JwtVerifier::looks_like_jwt(presented)
        {
            return match jwt.verify(presented).await {
                Ok(client) => match self.clients.get(&client) {
                    Some(&i) => Ok(Some(&self.keys[i].0)),
                    None => {
                        debug!(
                            client,
                            "a valid Entra ID token from an application that is no consumer"
                        );
                        Err(GatewayError::Unauthorized)
                    }
                },
                Err(why) => {
                    debug!(%why, "Entra ID token refused");
                    Err(GatewayError::Unauthorized)
                }
            };
        }
        let presented = hash(presented);
        // Compare against every hash in constant time so timing reveals nothing.
        let mut found = None;
        for (consumer, key) in &self.keys {
            if let Some(key) = key
                && bool::from(presented.ct_eq(key))
            {
                found = Some(consumer);
            }
        }
        found.map(Some).ok_or(GatewayError::Unauthorized)
    }
}

/// A consumer's key hash: configured, or the key from its environment variable, hashed (the
/// key itself goes out of scope here).
fn key_hash_of(c: &ConsumerConfig) -> Result<Option<KeyHash>, String> {
    match (&c.key_sha256, &c.key_env) {
        (None, None) if c.client_id.is_some() => Ok(None),
        (Some(hex_hash), None) => hex::decode(hex_hash)
            .ok()
            .and_then(|h| KeyHash::try_from(h).ok())
            .map(Some)
            .ok_or_else(|| format!("consumer {}: key_sha256 is not 64 hex digits", c.name)),
        (None, Some(var)) => std::env::var(var)
            .map(|key| Some(hash(&key)))
            .map_err(|_| format!("environment variable {var} is not set")),
        _ => Err(format!(
            "consumer {}: needs exactly one of key_sha256 and key_env",
            c.name
        )),
    }
}

/// The key from `api-key`, else from `Authorization: Bearer`.
fn client_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim());
    }
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumers() -> Consumers {
        let named = |name: &str| Consumer {
            name: name.into(),
            regions: None,
            pools: None,
            max_prompt_tokens: None,
            max_tokens: None,
            tpm: None,
            rpm: None,
            token_quota: None,
            max_spend: None,
            class: None,
            enforce: true,
        };
        Consumers {
            keys: vec![
                (named("chat-app"), Some(hash("k1"))),
                (named("batch"), Some(hash("k2"))),
            ],
            ..Default::default()
        }
    }

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn accepts_api_key_and_bearer() {
        let c = consumers();
        assert_eq!(
            c.authenticate(&headers("api-key", "k1"))
                .await
                .unwrap()
                .map(|c| c.name.as_str()),
            Some("chat-app")
        );
        assert_eq!(
            c.authenticate(&headers("authorization", "Bearer k2"))
                .await
                .unwrap()
                .map(|c| c.name.as_str()),
            Some("batch")
        );
    }

    #[tokio::test]
    async fn rejects_wrong_or_missing_key() {
        let c = consumers();
        assert!(c.authenticate(&headers("api-key", "nope")).await.is_err());
        assert!(c.authenticate(&HeaderMap::new()).await.is_err());
        assert!(
            c.authenticate(&headers("authorization", "Basic k1"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn configured_hashes_match_their_keys() {
        let config = ConsumerConfig {
            name: "hashed".into(),
            key_sha256: Some(key_sha256_hex("s3cret")),
            ..Default::default()
        };
        // SHA-256 of "s3cret" as `sha256sum` prints it: the hex form is the standard one.
        assert_eq!(
            config.key_sha256.as_deref(),
            Some("1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0")
        );
        let c = Consumers::from_config(&[config], None).unwrap();
        assert!(c.authenticate(&headers("api-key", "s3cret")).await.is_ok());
        assert!(
            c.authenticate(&headers("api-key", "s3cret ")).await.is_ok(),
            "trimmed"
        );
        assert!(c.authenticate(&headers("api-key", "s3cre")).await.is_err());
    }

    #[tokio::test]
    async fn open_when_no_consumers() {
        assert_eq!(
            Consumers::default()
                .authenticate(&HeaderMap::new())
                .await
                .unwrap(),
            None
        );
    }
}
