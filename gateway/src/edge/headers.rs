//! Which headers cross the gateway. Upstream gets an allow-list of the client's headers
//! (never cookies, client credentials or hop-by-hop headers); the client gets the upstream's
//! headers minus hop-by-hop ones, cookies and anything naming the backend's host.

use axum::http::{HeaderMap, HeaderName, header};

/// Client headers forwarded upstream by default: content type and negotiation, the client's
/// identity and trace context, and OpenAI / Azure OpenAI request options.
/// `accept-encoding` is left out on purpose: the gateway reads every body for its usage, so
/// it asks backends for answers as they are (no compression to undo on every answer).
pub const FORWARDED_BY_DEFAULT: [&str; 12] = [
    "content-type",
    "accept",
    "accept-language",
    "user-agent",
    "traceparent",
    "tracestate",
    "x-ms-client-request-id",
    "x-ms-useragent",
    "openai-beta",
    "openai-organization",
    "openai-project",
    "x-request-id",
];

/// Headers that describe the client's connection, forwarded only when configured
/// (`headers.forward_x_forwarded`, e.g. behind Application Gateway).
const CLIENT_ADDRESS: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
];

pub use crate::config::NEVER_FORWARDED;

/// Connection-level headers (RFC 9110 §7.6.1); headers named in `Connection` are too.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// Response headers the client never sees: cookies, redirects (the gateway follows none,
/// and a backend's redirect names its network, not the client's), and headers that describe
/// the upstream's own network (alternative services, proxies on the way, forwarding).
const RESPONSE_DROPPED: [&str; 12] = [
    "set-cookie",
    "set-cookie2",
    "location",
    "content-location",
    "refresh",
    "alt-svc",
    "via",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
];

/// The request-header allow-list of one gateway, from `[headers]`.
#[derive(Clone, Debug)]
pub struct HeaderPolicy {
    forwarded: Vec<HeaderName>,
}

impl HeaderPolicy {
    /// The default allow-list plus `extra` names; with `client_address`, the
    /// `x-forwarded-*` / `forwarded` headers too. Names in [`NEVER_FORWARDED`] are refused
    /// by configuration validation and ignored here.
    pub fn new(extra: &[String], client_address: bool) -> Self {
        let mut forwarded: Vec<HeaderName> = FORWARDED_BY_DEFAULT
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .chain(
                client_address
                    .then_some(CLIENT_ADDRESS)
                    .into_iter()
                    .flatten(),
            )
            .filter(|n| !NEVER_FORWARDED.contains(&n.to_ascii_lowercase().as_str()))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        forwarded.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        forwarded.dedup();
        Self { forwarded }
    }

    /// Client request headers to send upstream: the allow-listed ones only.
    pub fn upstream_request(&self, client: &HeaderMap) -> HeaderMap {
        let named = connection_named(client);
        let mut out = HeaderMap::new();
        for name in &self.forwarded {
            if named.iter().any(|n| n == name.as_str()) {
                continue;
            }
            for value in client.get_all(name) {
                out.append(name.clone(), value.clone());
            }
        }
        out
    }
}

impl Default for HeaderPolicy {
    fn default() -> Self {
        Self::new(&[], false)
    }
}

/// Upstream response headers to send to the client. `backend_host` is the host the
/// response came from: a header that names it (a `location`, a `link`) is dropped.
pub fn client_response_headers(upstream: &HeaderMap, backend_host: Option<&str>) -> HeaderMap {
    let named = connection_named(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        let names_host =
            backend_host.is_some_and(|h| contains_ignoring_case(value.as_bytes(), h.as_bytes()));
        if HOP_BY_HOP.contains(name)
            || RESPONSE_DROPPED.contains(&name.as_str())
            || named.iter().any(|n| n == name.as_str())
            || names_host
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Whether `haystack` contains `needle`, ASCII case ignored (no allocation: this runs for
/// every header of every response).
pub(crate) fn contains_ignoring_case(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let Some(last_start) = haystack.len().checked_sub(needle.len()) else {
        return false;
    };
    // Candidates are found by the first byte in either case (memchr), then compared.
    let (lower, upper) = (first.to_ascii_lowercase(), first.to_ascii_uppercase());
    let mut from = 0;
    while let Some(i) = memchr::memchr2(lower, upper, &haystack[from..=last_start]) {
        let at = from + i;
        if haystack[at + 1..at + needle.len()].eq_ignore_ascii_case(rest) {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Header names listed in `Connection` (lower case).
fn connection_named(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The memchr search finds exactly what comparing every window finds.
        #[test]
        fn contains_ignoring_case_is_the_window_scan(
            haystack in "[a-cA-C.:/]{0,24}",
            needle in "[a-cA-C.]{0,4}",
        ) {
            let windows = needle.is_empty()
                || haystack
                    .as_bytes()
                    .windows(needle.len())
                    .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()));
            proptest::prop_assert_eq!(
                contains_ignoring_case(haystack.as_bytes(), needle.as_bytes()),
                windows
            );
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        n.sort();
        n
    }

    #[test]
    fn only_allow_listed_request_headers_go_upstream() {
        let client = map(&[
            ("api-key", "client-secret"),
            ("authorization", "Bearer client-secret"),
            ("cookie", "session=1"),
            ("connection", "keep-alive, x-ms-useragent"),
            ("x-ms-useragent", "named-in-connection"),
            ("te", "trailers"),
            ("host", "gateway"),
            ("content-length", "2"),
            ("accept-encoding", "gzip"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-internal", "1"),
            ("content-type", "application/json"),
            ("x-ms-client-request-id", "abc"),
            ("openai-beta", "assistants=v2"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ]);
        let out = HeaderPolicy::default().upstream_request(&client);
        assert_eq!(
            names(&out),
            [
                "content-type",
                "openai-beta",
                "traceparent",
                "x-ms-client-request-id"
            ]
        );
    }

    #[test]
    fn configured_extras_and_client_address_are_forwarded_but_never_credentials() {
        let client = map(&[
            ("x-internal", "1"),
            ("x-forwarded-for", "10.0.0.1"),
            ("cookie", "session=1"),
        ]);
        let policy = HeaderPolicy::new(&["X-Internal".into(), "Cookie".into()], true);
        assert_eq!(
            names(&policy.upstream_request(&client)),
            ["x-forwarded-for", "x-internal"]
        );
    }

    #[test]
    fn cookies_and_the_backend_host_never_reach_the_client() {
        let upstream = map(&[
            ("set-cookie", "affinity=abc; Path=/"),
            ("alt-svc", "h3=\":443\""),
            ("location", "https://Contoso-East.openai.azure.com/openai/x"),
            ("x-ms-region", "East US"),
            ("x-ratelimit-remaining-tokens", "100"),
            ("transfer-encoding", "chunked"),
        ]);
        let out = client_response_headers(&upstream, Some("contoso-east.openai.azure.com"));
        assert_eq!(names(&out), ["x-ms-region", "x-ratelimit-remaining-tokens"]);
    }
}
