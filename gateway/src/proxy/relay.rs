//! Relay an upstream response to the client, body streamed chunk by chunk as it arrives.
//! Dropping the client's body (disconnect) drops the upstream stream, which cancels it.

use axum::body::Body;
use axum::response::Response;
use futures_util::StreamExt;

use super::forward::Upstream;
use crate::headers::client_response_headers;

pub fn to_client(upstream: Upstream) -> Response {
    let body = upstream
        .body
        .map(|chunk| chunk.map_err(std::io::Error::other));
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = upstream.status;
    *response.headers_mut() = client_response_headers(&upstream.headers);
    response
}
