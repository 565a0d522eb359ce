//! `[headers]`: which client headers go upstream, and the consumer budget headers.

use super::*;

/// Never forwarded, whatever `headers.forward` says: credentials and cookies (the header
/// policy, `edge::headers`, applies it).
pub const NEVER_FORWARDED: [&str; 5] = [
    "authorization",
    "api-key",
    "cookie",
    "proxy-authorization",
    "ocp-apim-subscription-key",
];

/// Which client request headers are forwarded upstream (besides the built-in allow-list),
/// and the names of the consumer budget headers on responses.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    /// More header names to forward. Credentials and cookies are refused.
    pub forward: Vec<String>,
    /// Forward `forwarded` / `x-forwarded-*` (the client's address as a front proxy saw it).
    pub forward_x_forwarded: bool,
    /// For a consumer with a budget: the header carrying its remaining tokens (replacing
    /// the deployment's own), and its remaining requests (API Management names them too).
    pub consumer_remaining_tokens: String,
    pub consumer_remaining_requests: String,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        Self {
            forward: Vec::new(),
            forward_x_forwarded: false,
            consumer_remaining_tokens: "x-ratelimit-remaining-tokens".into(),
            consumer_remaining_requests: "x-ratelimit-remaining-requests".into(),
        }
    }
}

impl HeadersConfig {
    pub(super) fn validate(&self, bad: &mut impl FnMut(String, String)) {
        for (key, name) in [
            (
                "headers.consumer_remaining_tokens",
                &self.consumer_remaining_tokens,
            ),
            (
                "headers.consumer_remaining_requests",
                &self.consumer_remaining_requests,
            ),
        ] {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                bad(key.into(), format!("{name:?} is not a header name"));
            }
        }
        for (i, name) in self.forward.iter().enumerate() {
            let key = format!("headers.forward[{i}]");
            let lower = name.to_ascii_lowercase();
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                bad(key, format!("{name:?} is not a header name"));
            } else if NEVER_FORWARDED.contains(&lower.as_str()) {
                bad(
                    key,
                    format!("{name:?} carries credentials or cookies and is never forwarded"),
                );
            }
        }
    }
}
