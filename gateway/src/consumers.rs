//! Client authentication: which consumer sent this request, by its key. Only SHA-256 hashes
//! of the keys are held: a presented key is hashed and compared, in constant time, with every
//! consumer's hash.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ConsumerConfig;
use crate::error::GatewayError;
use crate::quota_period::QuotaPeriod;

/// A key's SHA-256.
type KeyHash = [u8; 32];

/// The configured consumers. With none, access is open (a warning is logged at start).
#[derive(Debug, Default)]
pub struct Consumers {
    keys: Vec<(Consumer, KeyHash)>,
}

/// The SHA-256 of a key, in hex: what `key_sha256` holds (`spillway hash-key`).
pub fn key_sha256_hex(key: &str) -> String {
    hex::encode(hash(key))
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
}

impl Consumer {
    pub fn may_use(&self, pool: &str) -> bool {
        self.pools
            .as_ref()
            .is_none_or(|pools| pools.iter().any(|p| p == pool))
    }
}

impl Consumers {
    pub fn from_config(consumers: &[ConsumerConfig]) -> Result<Self, String> {
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
                };
                Ok((consumer, key_hash_of(c)?))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { keys })
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The consumer, `None` when access is open, or 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<&Consumer>, GatewayError> {
        if self.is_open() {
            return Ok(None);
        }
        let presented = hash(client_key(headers).ok_or(GatewayError::Unauthorized)?);
        // Compare against every hash in constant time so timing reveals nothing.
        let mut found = None;
        for (consumer, key) in &self.keys {
            if bool::from(presented.ct_eq(key)) {
                found = Some(consumer);
            }
        }
        found.map(Some).ok_or(GatewayError::Unauthorized)
    }
}

/// A consumer's key hash: configured, or the key from its environment variable, hashed (the
/// key itself goes out of scope here).
fn key_hash_of(c: &ConsumerConfig) -> Result<KeyHash, String> {
    match (&c.key_sha256, &c.key_env) {
        (Some(hex_hash), None) => hex::decode(hex_hash)
            .ok()
            .and_then(|h| KeyHash::try_from(h).ok())
            .ok_or_else(|| format!("consumer {}: key_sha256 is not 64 hex digits", c.name)),
        (None, Some(var)) => std::env::var(var)
            .map(|key| hash(&key))
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
        };
        Consumers {
            keys: vec![
                (named("chat-app"), hash("k1")),
                (named("batch"), hash("k2")),
            ],
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

    #[test]
    fn accepts_api_key_and_bearer() {
        let c = consumers();
        assert_eq!(
            c.authenticate(&headers("api-key", "k1"))
                .unwrap()
                .map(|c| c.name.as_str()),
            Some("chat-app")
        );
        assert_eq!(
            c.authenticate(&headers("authorization", "Bearer k2"))
                .unwrap()
                .map(|c| c.name.as_str()),
            Some("batch")
        );
    }

    #[test]
    fn rejects_wrong_or_missing_key() {
        let c = consumers();
        assert!(c.authenticate(&headers("api-key", "nope")).is_err());
        assert!(c.authenticate(&HeaderMap::new()).is_err());
        assert!(
            c.authenticate(&headers("authorization", "Basic k1"))
                .is_err()
        );
    }

    #[test]
    fn configured_hashes_match_their_keys() {
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
        let c = Consumers::from_config(&[config]).unwrap();
        assert!(c.authenticate(&headers("api-key", "s3cret")).is_ok());
        assert!(
            c.authenticate(&headers("api-key", "s3cret ")).is_ok(),
            "trimmed"
        );
        assert!(c.authenticate(&headers("api-key", "s3cre")).is_err());
    }

    #[test]
    fn open_when_no_consumers() {
        assert_eq!(
            Consumers::default()
                .authenticate(&HeaderMap::new())
                .unwrap(),
            None
        );
    }
}
