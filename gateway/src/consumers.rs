//! Client authentication: which consumer sent this request, by its key.

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::ConsumerConfig;
use crate::error::GatewayError;
use crate::secret::Secret;

/// The configured consumers. With none, access is open (a warning is logged at start).
#[derive(Debug, Default)]
pub struct Consumers {
    keys: Vec<(Consumer, Secret)>,
}

/// Who sent a request, and where its requests may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    pub name: String,
    /// Data residency: only members in these regions.
    pub regions: Option<Vec<String>>,
}

impl Consumers {
    pub fn from_config(consumers: &[ConsumerConfig]) -> Result<Self, String> {
        let keys = consumers
            .iter()
            .map(|c| {
                std::env::var(&c.key_env)
                    .map(|k| {
                        (
                            Consumer {
                                name: c.name.clone(),
                                regions: c.regions.clone(),
                            },
                            Secret::new(k),
                        )
                    })
                    .map_err(|_| format!("environment variable {} is not set", c.key_env))
            })
            .collect::<Result<_, _>>()?;
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
        let presented = client_key(headers).ok_or(GatewayError::Unauthorized)?;
        // Compare against every key in constant time so timing reveals nothing.
        let mut found = None;
        for (consumer, key) in &self.keys {
            if bool::from(presented.as_bytes().ct_eq(key.expose().as_bytes())) {
                found = Some(consumer);
            }
        }
        found.map(Some).ok_or(GatewayError::Unauthorized)
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
        };
        Consumers {
            keys: vec![
                (named("chat-app"), Secret::new("k1")),
                (named("batch"), Secret::new("k2")),
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
    fn open_when_no_consumers() {
        assert_eq!(
            Consumers::default()
                .authenticate(&HeaderMap::new())
                .unwrap(),
            None
        );
    }
}
