//! Limits that answer instead of breaking: oversized bodies get a 413 the client can read,
//! slow clients are cut without slowing others, header floods get 431, framing conflicts
//! cannot smuggle a request, a full replica sheds load with 503 while its probes answer, and
//! the admin listener wants its token. Its own test binary because it sets an environment
//! variable.

use std::sync::Once;
use std::time::Duration;

use futures_util::StreamExt;
use spillway_gateway::config::Config;
use spillway_gateway::edge::http_server::{self, ConnectionLimits};
use spillway_gateway::sim::SimHandle;
use spillway_tests::wire::{self, WireResponse};
use spillway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const BODY: &str = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
const ADMIN_TOKEN: &str = "edge-admin-token-7f3a";

async fn gateway(extra: &str) -> (SimHandle, Replica) {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + extra)).await;
    (sim, gw)
}

async fn connect(gw: &Replica) -> TcpStream {
    TcpStream::connect(wire::authority(&gw.url))
        .await
        .expect("connect")
}

#[tokio::test]
async fn an_oversized_body_gets_a_413_the_client_reads_after_sending_it_all() {
    let (sim, gw) = gateway("[server]\nmax_body_bytes = 1024\n").await;
    // Far more than the socket buffers hold: without a drain the server would close while
    // the client is still writing, and the client would see a reset instead of the answer.
    let body = vec![b' '; 16 * 1024 * 1024];

    let mut stream = connect(&gw).await;
    stream
        .write_all(wire::post_head(CHAT, body.len(), "").as_bytes())
        .await
        .unwrap();
    stream
        .write_all(&body)
        .await
        .expect("the whole body is taken while the 413 waits");
    let response = wire::read_response(&mut stream).await;
    assert_eq!(response.status, 413);
    assert_eq!(response.error_code(), "request_too_large");

    // Chunked, so the size is only learnt while reading.
    let mut stream = connect(&gw).await;
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: spillway\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(64 * 1024) {
        stream
            .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(piece).await.expect("chunk taken");
        stream.write_all(b"\r\n").await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let response = wire::read_response(&mut stream).await;
    assert_eq!(response.status, 413);
    assert_eq!(sim.received_total(), 0);
}

#[tokio::test]
async fn a_client_waiting_for_100_continue_gets_its_413_without_sending() {
    let (_sim, gw) = gateway("[server]\nmax_body_bytes = 1024\n").await;
    let head = wire::post_head(CHAT, 16 * 1024 * 1024, "expect: 100-continue\r\n");
    let response = wire::http1(&gw.url, head.as_bytes()).await;
    assert_eq!(response.status, 413);
}

/// Write `bytes` one at a time, `pause` apart, until done or the server closes.
fn trickle(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    bytes: Vec<u8>,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for byte in bytes {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    })
}

#[tokio::test]
async fn slow_clients_are_cut_and_other_clients_are_served_meanwhile() {
    let (_sim, gw) = gateway("[server]\nheader_timeout_ms = 1000\nbody_timeout_ms = 1000\n").await;
    let pause = Duration::from_millis(50);

    // Slowloris: request heads trickled a byte at a time (forever, at this pace).
    let mut heads = Vec::new();
    for _ in 0..20 {
        let (reader, writer) = connect(&gw).await.into_split();
        let head = wire::post_head(CHAT, BODY.len(), "x-padding: ").into_bytes();
        let endless: Vec<u8> = head
            .into_iter()
            .chain(std::iter::repeat_n(b'a', 10_000))
            .collect();
        heads.push((reader, trickle(writer, endless, pause)));
    }
    // A connection that never sends anything.
    let mut silent = connect(&gw).await;
    // A complete head, then a body trickled far slower than the body timeout allows.
    let (mut body_reader, mut body_writer) = connect(&gw).await.into_split();
    body_writer
        .write_all(wire::post_head(CHAT, BODY.len(), "").as_bytes())
        .await
        .unwrap();
    let body_task = trickle(
        body_writer,
        BODY.as_bytes().to_vec(),
        Duration::from_millis(200),
    );

    // Meanwhile, ordinary clients are served as usual.
    for _ in 0..10 {
        assert_eq!(chat(&gw, "gpt-4o", &chat_body(false)).await.status(), 200);
    }

    for (mut reader, task) in heads {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(EVENT_TIMEOUT, reader.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a trickled head was not cut");
        task.abort();
    }
    assert!(
        wire::closed_by_peer(&mut silent, EVENT_TIMEOUT).await,
        "a silent connection was not cut"
    );
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(EVENT_TIMEOUT, body_reader.read_to_end(&mut raw)).await;
    body_task.abort();
    let response = wire::parse_response(&raw).expect("the body trickler gets an answer");
    assert_eq!(response.status, 408);
    assert_eq!(response.error_code(), "request_timeout");
}

#[tokio::test]
async fn header_floods_get_431() {
    let (sim, gw) = gateway("").await;
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let request = wire::post_head(CHAT, BODY.len(), &many) + BODY;
    assert_eq!(wire::http1(&gw.url, request.as_bytes()).await.status, 431);

    let huge = format!("x-big: {}\r\n", "a".repeat(100 * 1024));
    let request = wire::post_head(CHAT, BODY.len(), &huge) + BODY;
    let response = tokio::time::timeout(EVENT_TIMEOUT, async {
        let mut stream = connect(&gw).await;
        // The server may answer and close before it has read everything we write.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        wire::parse_response(&raw)
    })
    .await
    .unwrap();
    assert_eq!(response.map(|r| r.status), Some(431));
    assert_eq!(sim.received_total(), 0);

    let request = wire::post_head(CHAT, BODY.len(), "x-one: v\r\n") + BODY;
    assert_eq!(wire::http1(&gw.url, request.as_bytes()).await.status, 200);
}

#[tokio::test]
async fn conflicting_framing_is_refused_or_cannot_smuggle() {
    let (sim, gw) = gateway("").await;
    // Two different lengths: 400 (from the HTTP parser, before any handler).
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: s\r\ncontent-type: application/json\r\ncontent-length: {}\r\ncontent-length: 5\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    assert_eq!(wire::http1(&gw.url, request.as_bytes()).await.status, 400);
    // A non-chunked transfer coding: 400.
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: s\r\ncontent-type: application/json\r\ntransfer-encoding: gzip\r\n\r\n{BODY}"
    );
    assert_eq!(wire::http1(&gw.url, request.as_bytes()).await.status, 400);
    assert_eq!(sim.received_total(), 0);

    // Chunked and a length that disagrees, with a second request hidden behind the chunked
    // body: the chunked framing wins (RFC 9112 §6.3), the connection closes after the one
    // answer, and the hidden request is never served.
    let smuggled = wire::post_head(CHAT, BODY.len(), "") + BODY;
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: s\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\ncontent-length: {}\r\n\r\n{:x}\r\n{BODY}\r\n0\r\n\r\n{smuggled}",
        BODY.len() + 10 + smuggled.len(),
        BODY.len()
    );
    let mut stream = connect(&gw).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, stream.read_to_end(&mut raw))
        .await
        .expect("the connection is closed after one answer")
        .unwrap();
    let answers = raw.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
    assert_eq!(answers, 1, "{}", String::from_utf8_lossy(&raw));
    assert!(sim.received_total() <= 1);
}

#[tokio::test]
async fn a_full_replica_sheds_load_at_once_and_still_answers_its_probes() {
    let sim = start_sim(vec![resource("ptu", vec![long_stream_deployment()])]).await;
    let config = backend(&sim, "ptu", 1) + "[server]\nmax_concurrent_requests = 2\n";
    let gw = start_single(&config).await;

    // Two streams in flight hold both slots until their last byte.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let response = chat(&gw, "gpt-4o", &chat_body(true)).await;
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        body.next().await.expect("first chunk").unwrap();
        streams.push(body);
    }
    let response = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "retry-after"), "1");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    for probe in ["/healthz", "/readyz"] {
        let r = client()
            .get(format!("{}{probe}", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{probe} under overload");
    }

    // A client going away frees its slot.
    drop(streams.pop());
    tokio::time::timeout(EVENT_TIMEOUT, gw.gateway.slots.freed())
        .await
        .expect("the slot is freed when the stream ends");
    let response = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_ne!(response.status(), 503);
}

fn set_admin_token() {
    static ONCE: Once = Once::new();
    // SAFETY: set once, before any test in this binary reads the environment.
    ONCE.call_once(|| unsafe { std::env::set_var("SPILLWAY_EDGE_ADMIN_TOKEN", ADMIN_TOKEN) });
}

#[tokio::test]
async fn an_admin_listener_off_loopback_without_a_token_refuses_to_start() {
    let sim = ptu_and_payg().await;
    let config = backend(&sim, "ptu", 1)
        + "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\n";
    let config = Config::from_toml(&config).unwrap();
    let error = tokio::time::timeout(EVENT_TIMEOUT, spillway_gateway::server::serve(config, None))
        .await
        .expect("serve returns at once")
        .expect_err("serve refuses to start");
    assert!(
        error.to_string().contains("server.admin_token_env"),
        "{error}"
    );
}

async fn admin_get(url: &str, path: &str, token: Option<&str>) -> WireResponse {
    let mut request = client().get(format!("{url}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    WireResponse {
        status: response.status().as_u16(),
        headers: Vec::new(),
        body: response.bytes().await.unwrap().to_vec(),
    }
}

#[tokio::test]
async fn the_admin_listener_wants_its_bearer_token() {
    set_admin_token();
    let sim = ptu_and_payg().await;
    let config = backend(&sim, "ptu", 1)
        + "[server]\nadmin_listen = \"0.0.0.0:0\"\nadmin_token_env = \"SPILLWAY_EDGE_ADMIN_TOKEN\"\n";
    let gw = start_single(&config).await;
    // The admin router on a loopback port, as `serve` runs it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(http_server::serve(
        listener,
        spillway_gateway::admin(gw.gateway.clone()),
        ConnectionLimits::default(),
        std::future::pending(),
    ));

    let missing = admin_get(&url, "/metrics", None).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.error_code(), "401");
    assert_eq!(admin_get(&url, "/metrics", Some("wrong")).await.status, 401);
    let wrong_length = format!("{ADMIN_TOKEN}x");
    assert_eq!(
        admin_get(&url, "/metrics", Some(&wrong_length))
            .await
            .status,
        401
    );
    let ok = admin_get(&url, "/metrics", Some(ADMIN_TOKEN)).await;
    assert_eq!(ok.status, 200);
    assert!(String::from_utf8_lossy(&ok.body).contains("spillway_fleet_state_degraded"));
    assert_eq!(admin_get(&url, "/healthz", None).await.status, 200);

    // A request naming a host that is not the listener's (a page's own name, rebound to
    // this address) is refused whatever it carries; IP addresses and localhost are fine.
    let port = wire::authority(&url).rsplit(':').next().unwrap().to_owned();
    for (host, status) in [
        (format!("evil.example:{port}"), 403),
        ("evil.example".to_owned(), 403),
        (format!("localhost:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        (format!("[::1]:{port}"), 200),
    ] {
        let request = format!(
            "GET /metrics HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {ADMIN_TOKEN}\r\nconnection: close\r\n\r\n"
        );
        let answer = wire::http1(&url, request.as_bytes()).await;
        assert_eq!(answer.status, status, "host {host}");
        if status == 403 {
            assert_eq!(answer.error_code(), "host_not_allowed");
        }
    }
}

/// A listener serves at most `server.max_connections` connections at once (another waits to
/// be accepted until one closes), and closes a connection that has had no request in flight
/// for `server.idle_timeout_ms`, over HTTP/1.1 and HTTP/2 alike. Both settings are the point.
#[tokio::test]
async fn connections_are_capped_and_idle_ones_are_closed() {
    let (_sim, gw) = gateway("[server]\nmax_connections = 2\nidle_timeout_ms = 400\n").await;
    let request = wire::post_head(CHAT, BODY.len(), "") + BODY;
    // Two keep-alive connections, each answered once and then idle.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&gw).await;
        stream.write_all(request.as_bytes()).await.unwrap();
        assert_eq!(wire::read_response(&mut stream).await.status, 200);
        open.push(stream);
    }
    // A third is only served once one of them is gone (closed for idleness).
    let mut third = connect(&gw).await;
    third.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(wire::read_response(&mut third).await.status, 200);
    let mut closed = false;
    for stream in &mut open {
        closed |= wire::closed_by_peer(stream, Duration::from_millis(50)).await;
    }
    assert!(closed, "the third was served before a slot was freed");

    // HTTP/2: a connection with an answered request and nothing since is closed too.
    let stream = TcpStream::connect(wire::authority(&gw.url)).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let post = hyper::Request::post(format!("http://{}{CHAT}", wire::authority(&gw.url)))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            BODY.as_bytes(),
        )))
        .unwrap();
    let answer = sender.send_request(post).await.unwrap();
    assert_eq!(answer.status(), 200);
    drop(answer);
    tokio::time::timeout(EVENT_TIMEOUT, connection)
        .await
        .expect("the idle HTTP/2 connection is closed by the gateway")
        .unwrap()
        .expect("closed gracefully (GOAWAY)");
}
