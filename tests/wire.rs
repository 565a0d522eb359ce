//! Clients that send exactly the bytes a test writes: raw HTTP/1.1 over TCP, and HTTP/2 with
//! prior knowledge through hyper, whose request target is sent as given (reqwest would
//! normalize `..` and `%2e` away before the gateway ever saw them).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::EVENT_TIMEOUT;

/// A response read off the wire.
#[derive(Debug)]
pub struct WireResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl WireResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// `error.code` of an Azure-shaped error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// `host:port` of a replica's `http://host:port` URL.
pub fn authority(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// A JSON POST head for `target` (path and query, sent as is) with `body_len` bytes to follow.
pub fn post_head(target: &str, body_len: usize, extra_headers: &str) -> String {
    format!(
        "POST {target} HTTP/1.1\r\nhost: spillway\r\ncontent-type: application/json\r\ncontent-length: {body_len}\r\n{extra_headers}connection: close\r\n\r\n"
    )
}

/// Send `request` on a new HTTP/1.1 connection and read the one response (until close).
pub async fn http1(url: &str, request: &[u8]) -> WireResponse {
    let mut stream = TcpStream::connect(authority(url)).await.expect("connect");
    stream.write_all(request).await.expect("request written");
    read_response(&mut stream).await
}

/// Read one `connection: close` response to its end.
pub async fn read_response(stream: &mut TcpStream) -> WireResponse {
    let mut raw = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, stream.read_to_end(&mut raw))
        .await
        .expect("response within the event timeout")
        .expect("response read");
    parse_response(&raw).expect("an HTTP/1.1 response")
}

pub fn parse_response(raw: &[u8]) -> Option<WireResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Some(WireResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || raw.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
    out
}

/// POST `body` to `target` over HTTP/2 with prior knowledge (h2c), the target sent as is.
pub async fn http2_post(url: &str, target: &str, body: &str) -> WireResponse {
    let stream = TcpStream::connect(authority(url)).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = hyper::Request::post(format!("http://{}{target}", authority(url)))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request builds");
    let response = tokio::time::timeout(EVENT_TIMEOUT, sender.send_request(request))
        .await
        .expect("answer within the event timeout")
        .expect("h2 response");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("h2 body")
        .to_bytes()
        .to_vec();
    WireResponse {
        status,
        headers,
        body,
    }
}

/// True when the peer closes `stream` (or resets it) within `within`, reading and discarding
/// whatever it sends first.
pub async fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}
