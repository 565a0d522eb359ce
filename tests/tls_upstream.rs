//! Azure OpenAI is reached over HTTPS: the gateway's upstream client speaks TLS to backends
//! whose certificate the system trusts (here a test CA named by `SSL_CERT_FILE`), prefers
//! HTTP/2 where the backend offers it (ALPN), relays answers and streams as over plain HTTP,
//! and refuses a backend whose certificate it does not trust (failing over, never sending the
//! request). Its own binary: it sets `SSL_CERT_FILE` before any thread starts.
//!
//! The backend is the simulator behind a TLS terminator that forwards the decrypted bytes
//! (the simulator's server speaks HTTP/1.1 and HTTP/2 alike) and records what ALPN chose.

use std::sync::{Arc, Mutex};

use spillway_gateway::config::TlsConfig;
use spillway_tests::pki::{Pki, ServerCert};
use spillway_tests::*;
use tokio::net::{TcpListener, TcpStream};

/// A TLS endpoint on loopback in front of `plain` (host:port); the ALPN protocol of each
/// connection it accepted, in order.
async fn tls_in_front_of(plain: String, certs: &ServerCert) -> (String, Arc<Mutex<Vec<String>>>) {
    let acceptor = spillway_gateway::edge::tls::acceptor(&TlsConfig {
        cert_file: certs.cert.clone(),
        key_file: certs.key.clone(),
    })
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let protocols = Arc::new(Mutex::new(Vec::new()));
    let seen = protocols.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, plain, seen) = (acceptor.clone(), plain.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    seen.lock().unwrap().push("refused".into());
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().unwrap_or(b"none").to_vec();
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&alpn).into_owned());
                let mut upstream = TcpStream::connect(plain).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    (url, protocols)
}

#[test]
fn backends_are_reached_over_tls_that_the_system_trusts() {
    let pki = Pki::new("tls-upstream");
    let trusted = pki.server_cert();
    let other = Pki::new("tls-upstream-untrusted");
    let untrusted = other.server_cert();
    // SAFETY: no other thread exists yet; the upstream client reads it when it is built.
    unsafe { std::env::set_var("SSL_CERT_FILE", &trusted.ca) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let sim = tiers_a_and_b().await;
        let plain = |id: &str| sim.url(id).trim_start_matches("http://").to_string();
        let (good, good_alpn) = tls_in_front_of(plain("a"), &trusted).await;
        let (bad, bad_alpn) = tls_in_front_of(plain("b"), &untrusted).await;

        // Only the trusted backend: answers and streams relayed, over HTTP/2.
        let gateway = start_single(&backend_at("a", &good, 1)).await;
        let answer = chat(&gateway, "gpt-4o", &chat_body(false)).await;
        assert_eq!(answer.status(), 200);
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
        let stream = chat(&gateway, "gpt-4o", &chat_body(true)).await;
        assert_eq!(stream.status(), 200);
        let text = stream.text().await.unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        assert_eq!(sim.received("a").len(), 2);
        let protocols = good_alpn.lock().unwrap().clone();
        assert_eq!(protocols, ["h2"], "one pooled HTTP/2 connection for both");

        // An untrusted backend first: refused at the handshake, the request served by the
        // trusted one; nothing reached the untrusted backend's deployment.
        let config = format!("{}{}", backend_at("b", &bad, 1), backend_at("a", &good, 2));
        let gateway = start_single(&config).await;
        let answer = chat(&gateway, "gpt-4o", &chat_body(false)).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(header(&answer, "x-spillway-backend"), "a");
        assert_eq!(sim.received("b").len(), 0);
        assert_eq!(bad_alpn.lock().unwrap().as_slice(), ["refused"]);
    });
}
