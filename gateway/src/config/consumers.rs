//! `[auth]` and `[[consumers]]`: who may call, with which keys or tokens, and their limits.

use super::*;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Entra ID (JWT) bearer tokens; the application's id maps to a consumer's `client_id`.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The token's `iss`: `https://login.microsoftonline.com/<tenant>/v2.0` for v2 tokens,
    /// `https://sts.windows.net/<tenant>/` for v1.
    pub issuer: String,
    /// Accepted `aud` values: the gateway's application ID URI and/or client id.
    pub audiences: Vec<String>,
    /// The signing keys: a JWKS file, or (exactly one of the two) a URL such as
    /// `https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys`.
    #[serde(default)]
    pub jwks_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A fetched key set is refreshed when older than this.
    #[serde(default = "default_jwks_refresh_s")]
    pub jwks_refresh_s: u64,
    /// Claims naming the calling application, first present wins.
    #[serde(default = "default_client_claims")]
    pub client_claims: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    #[serde(default = "default_jwt_leeway_s")]
    pub leeway_s: u64,
}

fn default_jwks_refresh_s() -> u64 {
    3600
}

fn default_client_claims() -> Vec<String> {
    vec!["azp".into(), "appid".into()]
}

fn default_jwt_leeway_s() -> u64 {
    30
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub name: String,
    /// SHA-256 of this consumer's key, in hex (`spillway hash-key` prints it): the key itself
    /// is never in the configuration.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Or: environment variable holding this consumer's key (hashed at start-up, then
    /// forgotten).
    #[serde(default)]
    pub key_env: Option<String>,
    /// The Entra ID application (client) id whose tokens are this consumer (`[auth.jwt]`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// When set, this consumer's requests only ever go to members in these regions
    /// (data residency), even when that means a 429.
    #[serde(default)]
    pub regions: Option<Vec<String>>,
    /// When set, the only pools this consumer may use (others: 403).
    #[serde(default)]
    pub pools: Option<Vec<String>>,
    /// Largest prompt (estimated tokens) this consumer may send (larger: 400).
    #[serde(default)]
    pub max_prompt_tokens: Option<u64>,
    /// Most output a request of this consumer may ask for: its `max_tokens` (or
    /// `max_completion_tokens`, `max_output_tokens`) must be set, and at most this (else 400).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Tokens and requests this consumer may spend per budget window (a minute by default),
    /// fleet-wide (over: 429 with `retry-after`).
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens this consumer may spend per `token_quota_period`, fleet-wide (spent: 403
    /// until the period ends).
    #[serde(default)]
    pub token_quota: Option<u64>,
    /// `hourly`, `daily`, `weekly` (from Monday) or `monthly` (the default), in UTC.
    #[serde(default)]
    pub token_quota_period: Option<crate::config::quota_period::QuotaPeriod>,
    /// USD this consumer may spend per `max_spend_period` (the `[[prices]]` of what it was
    /// served; PTU tokens at the reservation's price per token at full use), fleet-wide
    /// (spent: 403 until the period ends).
    #[serde(default)]
    pub max_spend_usd: Option<f64>,
    /// `hourly`, `daily`, `weekly` or `monthly` (the default), in UTC.
    #[serde(default)]
    pub max_spend_period: Option<crate::config::quota_period::QuotaPeriod>,
    /// Its traffic class (`[[classes]]`; the highest-ranked one when not set). A request
    /// may lower its own class, never raise it.
    #[serde(default)]
    pub class: Option<String>,
    /// `false`: shadow mode for its budgets and quota (`tpm`, `rpm`, `token_quota`): what
    /// they would refuse is counted (metrics, access log, span) and served. Default `true`.
    #[serde(default)]
    pub enforce: Option<bool>,
}

impl Config {
    pub(super) fn validate_consumers(
        &self,
        resolve: Resolve,
        bad: &mut impl FnMut(String, String),
    ) {
        let mut names = BTreeSet::new();
        let mut client_ids = BTreeSet::new();
        for (i, c) in self.consumers.iter().enumerate() {
            if c.name.is_empty() || !names.insert(c.name.as_str()) {
                bad(
                    format!("consumers[{i}].name"),
                    format!("{:?} must be non-empty and unique", c.name),
                );
            }
            if let Some(id) = &c.client_id
                && !client_ids.insert(id.as_str())
            {
                bad(
                    format!("consumers[{i}].client_id"),
                    format!("{id:?} is already another consumer's"),
                );
            }
            if c.client_id.is_some() && self.auth.jwt.is_none() {
                bad(
                    format!("consumers[{i}].client_id"),
                    "needs [auth.jwt] (the tokens it names are Entra ID tokens)".into(),
                );
            }
            match (&c.key_sha256, &c.key_env) {
                (None, None) if c.client_id.is_some() => {}
                (Some(hash), None) => {
                    if hex::decode(hash).map(|h| h.len()) != Ok(32) {
                        bad(
                            format!("consumers[{i}].key_sha256"),
                            "must be 64 hexadecimal digits (the output of `spillway hash-key`)"
                                .into(),
                        );
                    }
                }
                (None, Some(var)) => {
                    check_env(resolve, bad, format!("consumers[{i}].key_env"), var)
                }
                _ => bad(
                    format!("consumers[{i}]"),
                    "needs exactly one of key_sha256 and key_env (or only a client_id)".into(),
                ),
            }
            if c.max_spend_period.is_some() && c.max_spend_usd.is_none() {
                bad(
                    format!("consumers[{i}].max_spend_period"),
                    "is set without max_spend_usd".into(),
                );
            }
            if c.max_spend_usd
                .is_some_and(|usd| !(usd.is_finite() && usd > 0.0))
            {
                bad(
                    format!("consumers[{i}].max_spend_usd"),
                    "must be an amount in USD above 0".into(),
                );
            } else if c.max_spend_usd.is_some() && self.prices.is_empty() {
                bad(
                    format!("consumers[{i}].max_spend_usd"),
                    "needs [[prices]] to know what its tokens cost".into(),
                );
            }
            if c.token_quota_period.is_some() && c.token_quota.is_none() {
                bad(
                    format!("consumers[{i}].token_quota_period"),
                    "is set without token_quota".into(),
                );
            }
            for (key, value) in [
                ("tpm", c.tpm),
                ("rpm", c.rpm),
                ("max_tokens", c.max_tokens),
                ("token_quota", c.token_quota),
            ] {
                if value == Some(0) {
                    bad(
                        format!("consumers[{i}].{key}"),
                        "must be greater than 0".into(),
                    );
                }
            }
        }
    }
}

impl Config {
    /// The data plane serves anyone (no consumer keys, no Entra ID clients).
    pub fn is_anonymous(&self) -> bool {
        self.consumers.is_empty() && self.auth.jwt.is_none()
    }

    /// Fail closed: an anonymous data plane only on loopback, unless asked for by name.
    pub(super) fn validate_anonymous(&self, bad: &mut impl FnMut(String, String)) {
        if self.is_anonymous()
            && !self.server.listen.ip().is_loopback()
            && !self.server.allow_anonymous
        {
            bad(
                "consumers".into(),
                format!(
                    "none configured and no [auth.jwt], yet server.listen {} is not a loopback address: anyone reaching it would spend the backends' capacity. Add [[consumers]] (keys: `spillway hash-key`), or set server.allow_anonymous = true if a front door authenticates every request",
                    self.server.listen
                ),
            );
        }
    }

    pub(super) fn validate_jwt(&self, bad: &mut impl FnMut(String, String)) {
        let Some(jwt) = &self.auth.jwt else {
            return;
        };
        if jwt.issuer.is_empty() {
            bad("auth.jwt.issuer".into(), "must not be empty".into());
        }
        if jwt.audiences.is_empty() || jwt.audiences.iter().any(String::is_empty) {
            bad(
                "auth.jwt.audiences".into(),
                "must list at least one audience, none empty".into(),
            );
        }
        if jwt.client_claims.is_empty() {
            bad("auth.jwt.client_claims".into(), "must name a claim".into());
        }
        match (&jwt.jwks_file, &jwt.jwks_url) {
            (Some(_), None) => {}
            (None, Some(url)) => {
                if !jwks_url_is_trusted(url) {
                    bad(
                        "auth.jwt.jwks_url".into(),
                        "must be an https:// URL (http:// only to a loopback address): the keys it serves decide who is let in".into(),
                    );
                }
            }
            _ => bad(
                "auth.jwt".into(),
                "needs exactly one of jwks_file and jwks_url".into(),
            ),
        }
        if jwt.jwks_refresh_s == 0 {
            bad(
                "auth.jwt.jwks_refresh_s".into(),
                "must be greater than 0".into(),
            );
        }
    }
}

/// A key set is fetched over TLS, or from this machine (tests, a local sidecar).
pub(super) fn jwks_url_is_trusted(url: &str) -> bool {
    let Ok(url) = url::Url::parse(url) else {
        return false;
    };
    match url.scheme() {
        "https" => url.host().is_some(),
        "http" => match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
            None => false,
        },
        _ => false,
    }
}
