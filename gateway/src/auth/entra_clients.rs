//! Entra ID (JWT) clients. A bearer token is accepted when it is signed by one of the
//! tenant's keys (JWKS, from a file or fetched from a URL and cached), comes from the
//! configured issuer, is for one of the configured audiences, and is within its `exp`/`nbf`
//! (with a small leeway). The calling application's id, from a claim (`azp` for v2 tokens,
//! `appid` for v1, configurable), names the consumer.
//!
//! Keys from a URL are refreshed when older than `jwks_refresh_s`, and at once (at most every
//! [`FORCED_REFRESH_INTERVAL`]) when a token names a key not held: Entra rolls its keys, and
//! a flood of made-up key ids must not become a flood of fetches. One fetch at a time, and a
//! failed fetch (the endpoint down, before any key set was ever had too) is not tried again
//! within the interval.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::JwtConfig;

/// Least time between two fetches caused by unknown key ids.
pub const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// A JWKS endpoint gets this long to answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Why a token was refused: logged at debug, never shown to the client (every refusal is the
/// same 401).
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("not a JWT: {0}")]
    Malformed(String),
    #[error("no signing key {0:?} (after refreshing the key set)")]
    UnknownKey(Option<String>),
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("no client claim ({0})")]
    NoClient(String),
}

struct SigningKey {
    key: DecodingKey,
    algorithm: Algorithm,
}

struct KeySet {
    keys: HashMap<String, Arc<SigningKey>>,
    fetched: Option<Instant>,
}

enum Source {
    File,
    Url { url: String, http: reqwest::Client },
}

pub struct JwtVerifier {
    validation: Validation,
    client_claims: Vec<String>,
    refresh_after: Duration,
    source: Source,
    keys: RwLock<KeySet>,
    /// Held while fetching; the instant of the last forced fetch.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl JwtVerifier {
    /// From `[auth.jwt]`: a file's keys are read now (and must parse); a URL's are fetched
    /// on first use.
    pub fn from_config(config: &JwtConfig) -> Result<Self, String> {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway_s;
        let (source, keys) = match (&config.jwks_file, &config.jwks_url) {
            (Some(path), None) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let keys = parse_jwks(text.as_bytes())?;
                (Source::File, keys)
            }
            (None, Some(url)) => {
                let http = reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::limited(3))
                    .build()
                    .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
                let source = Source::Url {
                    url: url.clone(),
                    http,
                };
                (source, HashMap::new())
            }
            _ => return Err("needs exactly one of jwks_file and jwks_url".into()),
        };
        Ok(Self {
            validation,
            client_claims: config.client_claims.clone(),
            refresh_after: Duration::from_secs(config.jwks_refresh_s),
            source,
            keys: RwLock::new(KeySet {
                keys,
                fetched: None,
            }),
            fetching: tokio::sync::Mutex::new(None),
        })
    }

    /// Whether `token` is shaped like a JWT (three base64url parts), so a bearer credential
    /// is checked as one rather than as a key.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.starts_with("eyJ") && token.bytes().filter(|&b| b == b'.').count() == 2
    }

    /// The calling application's id, for a valid token.
    pub async fn verify(&self, token: &str) -> Result<String, Rejection> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Rejection::Malformed(e.to_string()))?;
        let key = self
            .key(header.kid.as_deref())
            .await
            .ok_or(Rejection::UnknownKey(header.kid))?;
        let mut validation = self.validation.clone();
        validation.algorithms = vec![key.algorithm];
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| Rejection::Invalid(e.to_string()))?
            .claims;
        self.client_claims
            .iter()
            .find_map(|name| claims.get(name).and_then(Value::as_str))
            .map(str::to_owned)
            .ok_or_else(|| Rejection::NoClient(self.client_claims.join(", ")))
    }

    /// The signing key named `kid` (a token without one: the only key, if there is one).
    async fn key(&self, kid: Option<&str>) -> Option<Arc<SigningKey>> {
        let lookup = |set: &KeySet| match kid {
            Some(kid) => set.keys.get(kid).cloned(),
            None if set.keys.len() == 1 => set.keys.values().next().cloned(),
            None => None,
        };
        let Source::Url { .. } = &self.source else {
            return lookup(&self.keys.read().expect("keys lock"));
        };
        let (found, stale) = {
            let set = self.keys.read().expect("keys lock");
            let stale = set
                .fetched
                .is_none_or(|at| at.elapsed() >= self.refresh_after);
            (lookup(&set), stale)
        };
        match found {
            // Known key, fresh set: the common case, no waiting.
            Some(key) if !stale => return Some(key),
            // Known key, old set: one request refreshes; the others go on with what is held.
            Some(key) => {
                if let Ok(mut guard) = self.fetching.try_lock() {
                    self.fetch(&mut guard, false).await;
                }
                return lookup(&self.keys.read().expect("keys lock")).or(Some(key));
            }
            None => {}
        }
        // Unknown key: wait for the fetch in flight, or make one (rate-limited).
        let mut guard = self.fetching.lock().await;
        if let Some(key) = lookup(&self.keys.read().expect("keys lock")) {
            return Some(key);
        }
        self.fetch(&mut guard, true).await;
        lookup(&self.keys.read().expect("keys lock"))
    }

    async fn fetch(&self, last_forced: &mut Option<Instant>, forced: bool) {
        let Source::Url { url, http } = &self.source else {
            return;
        };
        let ever_fetched = self.keys.read().expect("keys lock").fetched.is_some();
        // `last_forced` also marks the last failed fetch, so an unreachable endpoint is asked
        // at most once per interval whatever the tokens name.
        if forced && last_forced.is_some_and(|at| at.elapsed() < FORCED_REFRESH_INTERVAL) {
            return;
        }
        if forced && ever_fetched {
            *last_forced = Some(Instant::now());
        }
        match fetch_jwks(http, url).await {
            Ok(keys) => {
                debug!(keys = keys.len(), "JWKS refreshed");
                *self.keys.write().expect("keys lock") = KeySet {
                    keys,
                    fetched: Some(Instant::now()),
                };
            }
            // The keys held stay in use; tokens signed by others are refused meanwhile.
            Err(e) => {
                *last_forced = Some(Instant::now());
                warn!(error = %e, "cannot refresh the JWKS; keeping the keys held");
            }
        }
    }
}

async fn fetch_jwks(
    http: &reqwest::Client,
    url: &str,
) -> Result<HashMap<String, Arc<SigningKey>>, String> {
    let response = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("JWKS endpoint answered {}", response.status()));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
    {
        return Err("JWKS document too large".into());
    }
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    if body.len() > MAX_JWKS_BYTES {
        return Err("JWKS document too large".into());
    }
    parse_jwks(&body)
}

/// The usable signing keys of a JWKS document, by key id: RSA and EC public keys. Symmetric
/// keys are never accepted (a public key must not become an HMAC secret).
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<SigningKey>>, String> {
    let set: JwkSet = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else {
            continue;
        };
        let declared = jwk
            .common
            .key_algorithm
            .and_then(|a| Algorithm::try_from(a).ok());
        let algorithm = match (&jwk.algorithm, declared) {
            (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
            (
                AlgorithmParameters::RSA(_),
                Some(a @ (Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)),
            ) => a,
            (
                AlgorithmParameters::RSA(_),
                Some(a @ (Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512)),
            ) => a,
            (AlgorithmParameters::EllipticCurve(ec), declared) => match (&ec.curve, declared) {
                (EllipticCurve::P256, None | Some(Algorithm::ES256)) => Algorithm::ES256,
                (EllipticCurve::P384, None | Some(Algorithm::ES384)) => Algorithm::ES384,
                _ => continue,
            },
            _ => continue,
        };
        if let Ok(key) = DecodingKey::from_jwk(jwk) {
            keys.insert(kid.clone(), Arc::new(SigningKey { key, algorithm }));
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_and_keyless_entries_are_never_signing_keys() {
        let n = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";
        // Entra's keys carry x5t, x5c and issuer besides the RSA parameters, and no alg.
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "n": n, "e": "AQAB"},
            {"kty": "RSA", "use": "sig", "kid": "entra", "x5t": "abc", "n": n, "e": "AQAB",
             "x5c": ["MIIC"], "issuer": "https://login.microsoftonline.com/t/v2.0"},
            {"kty": "RSA", "kid": "rsa-384", "n": n, "e": "AQAB", "alg": "RS384"},
            {"kty": "RSA", "kid": "rsa-hs", "n": n, "e": "AQAB", "alg": "HS256"},
            {"kty": "RSA", "kid": "no-exponent", "n": n}
        ]});
        let keys = parse_jwks(jwks.to_string().as_bytes()).unwrap();
        let mut kids: Vec<_> = keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["entra", "rsa-384"]);
        assert_eq!(keys["entra"].algorithm, Algorithm::RS256);
        assert_eq!(keys["rsa-384"].algorithm, Algorithm::RS384);
        assert!(parse_jwks(b"[1,2]").is_err());
    }

    #[test]
    fn only_three_part_tokens_are_taken_for_jwts() {
        assert!(JwtVerifier::looks_like_jwt("eyJhbGciOi.eyJzdWIi.c2ln"));
        for key in ["sk-plain-key", "eyJ.only-two", "a.b.c", "eyJ.a.b.c"] {
            assert!(!JwtVerifier::looks_like_jwt(key), "{key}");
        }
    }
}
