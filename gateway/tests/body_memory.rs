//! A replica's memory is bounded by its configuration, not by what clients send. With the
//! default settings, four concurrent 14 MiB bodies built to blow up a parser (many tiny
//! values, many empty objects, deep nesting, one huge string, long token-id lists) keep one
//! `spillway serve`'s peak RSS under [`PEAK_RSS_BOUND_MIB`]; the shapes a chat request cannot
//! have are refused with 400 and never forwarded; and bodies past the replica's byte budget
//! in flight are refused with 503 before they are read.

mod common;

use common::{KillOnDrop, free_port, wait_ready};

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::header;
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::watch;

/// What one replica may reach with these bodies in flight (idle it is ~95 MiB, most of it
/// the two tokenizers; the Deployment's limit is 512 MiB). Measured 161 MiB (README).
const PEAK_RSS_BOUND_MIB: u64 = 256;
/// Each adversarial body (the default `max_body_bytes` is 16 MiB).
const BODY_BYTES: usize = 14 << 20;

const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#;

/// An upstream that reads each request whole, counts it, waits until `open` is true, and
/// answers a small chat completion.
struct Upstream {
    url: String,
    received: Arc<AtomicU64>,
    arrived: watch::Receiver<u64>,
    open: watch::Sender<bool>,
}

async fn upstream(open: bool) -> Upstream {
    let received = Arc::new(AtomicU64::new(0));
    let (arrived_tx, arrived) = watch::channel(0u64);
    let (open_tx, open_rx) = watch::channel(open);
    let counter = received.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Body| {
        let (counter, arrived_tx, mut open_rx) =
            (counter.clone(), arrived_tx.clone(), open_rx.clone());
        async move {
            let _ = body.collect().await;
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            arrived_tx.send_replace(n);
            let _ = open_rx.wait_for(|open| *open).await;
            ([(header::CONTENT_TYPE, "application/json")], ANSWER)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Upstream {
        url,
        received,
        arrived,
        open: open_tx,
    }
}

/// `spillway serve` with the default settings in front of `upstream`.
async fn gateway(upstream: &str, tag: &str) -> (KillOnDrop, String) {
    let dir = std::env::temp_dir().join(format!("spillway-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
         [[backends]]\nid = \"ptu\"\nurl = \"{upstream}\"\n\
         deployments = {{ \"gpt-4o\" = \"gpt-4o\", \"emb\" = \"emb\" }}\n",
        free_port()
    );
    std::fs::write(dir.join("spillway.toml"), config).unwrap();
    let child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(["serve", "--config"])
            .arg(dir.join("spillway.toml"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base).await;
    (child, base)
}

/// The process's peak resident set (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib / 1024
}

/// `{prefix}{unit × n}{suffix}` of about `BODY_BYTES`, the units comma-separated.
fn repeated(prefix: &str, unit: &str, suffix: &str) -> Bytes {
    let n = (BODY_BYTES - prefix.len() - suffix.len()) / (unit.len() + 1);
    let mut body = String::with_capacity(BODY_BYTES);
    body.push_str(prefix);
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push_str(unit);
    }
    body.push_str(suffix);
    Bytes::from(body)
}

fn tiny_values() -> Bytes {
    repeated(r#"{"messages":["#, "1", "]}")
}

fn empty_objects() -> Bytes {
    repeated(r#"{"max_tokens":1,"messages":["#, "{}", "]}")
}

fn deep_nesting() -> Bytes {
    let depth = BODY_BYTES / 2 - 64;
    let mut body = String::with_capacity(BODY_BYTES);
    body.push_str(r#"{"messages":[{"role":"user","content":"hi","x":"#);
    body.push_str(&"[".repeat(depth));
    body.push_str(&"]".repeat(depth));
    body.push_str("}]}");
    Bytes::from(body)
}

fn huge_string() -> Bytes {
    let mut body = String::with_capacity(BODY_BYTES);
    body.push_str(r#"{"max_tokens":1,"messages":[{"role":"user","content":""#);
    body.push_str(&"a".repeat(BODY_BYTES - 128));
    body.push_str(r#""}]}"#);
    Bytes::from(body)
}

fn token_ids() -> Bytes {
    repeated(r#"{"input":["#, "1", "]}")
}

async fn post(http: reqwest::Client, url: String, body: Bytes) -> (u16, String) {
    let answer = http
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversarial_bodies_keep_a_replica_within_its_memory_bound() {
    let upstream = upstream(true).await;
    let (child, base) = gateway(&upstream.url, "body-memory").await;
    let http = reqwest::Client::new();
    let chat = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let embeddings = format!("{base}/openai/deployments/emb/embeddings?api-version=2024-10-21");
    let warm = post(
        http.clone(),
        chat.clone(),
        Bytes::from_static(br#"{"messages":[]}"#),
    )
    .await;
    assert_eq!(warm.0, 200);
    let idle = peak_rss_mib(child.0.id());

    // Four at once, one of each shape; then four of the heaviest shapes that are valid.
    let round = |bodies: Vec<(String, Bytes)>| {
        futures_util::future::join_all(
            bodies
                .into_iter()
                .map(|(url, body)| post(http.clone(), url, body)),
        )
    };
    let mixed = round(vec![
        (chat.clone(), tiny_values()),
        (chat.clone(), empty_objects()),
        (chat.clone(), deep_nesting()),
        (chat.clone(), huge_string()),
    ])
    .await;
    let statuses: Vec<u16> = mixed.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [400, 200, 400, 200], "{mixed:?}");
    assert_eq!(mixed[0].1, "invalid_request");
    assert_eq!(
        upstream.received.load(Ordering::SeqCst),
        1 + 2,
        "the refused shapes were never forwarded"
    );
    let valid = round(vec![
        (chat.clone(), empty_objects()),
        (chat.clone(), huge_string()),
        (embeddings.clone(), token_ids()),
        (embeddings.clone(), token_ids()),
    ])
    .await;
    assert!(valid.iter().all(|(s, _)| *s == 200), "{valid:?}");

    let peak = peak_rss_mib(child.0.id());
    eprintln!("peak RSS {peak} MiB (idle {idle} MiB), bound {PEAK_RSS_BOUND_MIB} MiB");
    assert!(
        peak < PEAK_RSS_BOUND_MIB,
        "peak RSS {peak} MiB (idle {idle} MiB) is over {PEAK_RSS_BOUND_MIB} MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_replicas_budget_in_flight_are_refused_before_they_are_read() {
    // The upstream holds every request it gets until it is told to answer, so the bodies
    // stay in flight in the gateway.
    let mut upstream = upstream(false).await;
    let (_child, base) = gateway(&upstream.url, "body-budget").await;
    let http = reqwest::Client::new();
    let chat = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let body = || repeated(r#"{"max_tokens":1,"messages":["#, "{}", "]}");

    // Four 14 MiB bodies (56 MiB) are held; the default budget is 64 MiB.
    let held: Vec<_> = (0..4)
        .map(|_| tokio::spawn(post(http.clone(), chat.clone(), body())))
        .collect();
    tokio::time::timeout(
        Duration::from_secs(60),
        upstream.arrived.wait_for(|&n| n == 4),
    )
    .await
    .expect("four bodies reach the upstream")
    .unwrap();
    let refused = http
        .post(&chat)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let error: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "overloaded");
    // A small request still fits beside them.
    let small = tokio::spawn(post(
        http.clone(),
        chat.clone(),
        Bytes::from_static(br#"{"messages":[]}"#),
    ));
    upstream.arrived.wait_for(|&n| n == 5).await.unwrap();

    upstream.open.send_replace(true);
    for request in held {
        assert_eq!(request.await.unwrap().0, 200);
    }
    assert_eq!(small.await.unwrap().0, 200);
    // Their bytes are given back: the same body is served now.
    assert_eq!(post(http.clone(), chat.clone(), body()).await.0, 200);
}
