//! Which headers cross the gateway: hop-by-hop and credential headers never do.

use axum::http::{HeaderMap, HeaderName, header};

/// Connection-level headers (RFC 9110 §7.6.1) plus those the gateway sets itself.
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

fn strip(source: &HeaderMap, also: &[HeaderName]) -> HeaderMap {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = source
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(source.len());
    for (name, value) in source {
        if HOP_BY_HOP.contains(name)
            || also.contains(name)
            || named.iter().any(|n| n == name.as_str())
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Client request headers to send upstream: no client credential, no host, no length
/// (the HTTP client sets both for the upstream).
pub fn upstream_request_headers(client: &HeaderMap) -> HeaderMap {
    strip(
        client,
        &[
            header::HOST,
            header::CONTENT_LENGTH,
            header::AUTHORIZATION,
            HeaderName::from_static("api-key"),
        ],
    )
}

/// Upstream response headers to send to the client.
pub fn client_response_headers(upstream: &HeaderMap) -> HeaderMap {
    strip(upstream, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("api-key", "client-secret".parse().unwrap());
        h.insert("authorization", "Bearer client-secret".parse().unwrap());
        h.insert("connection", "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("host", "gateway".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("x-ms-client-request-id", "abc".parse().unwrap());
        let out = upstream_request_headers(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-ms-client-request-id"]);
    }
}
