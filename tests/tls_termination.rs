//! TLS termination on the data plane (`[server.tls]`): clients that trust the certificate's
//! CA are served over HTTP/2 and HTTP/1.1 (ALPN); plain HTTP and untrusting clients get
//! nothing; a key that does not match its certificate is a configuration problem.

use std::sync::Arc;

use spillway_gateway::Gateway;
use spillway_gateway::app::app;
use spillway_gateway::config::{Config, TlsConfig};
use spillway_gateway::edge::http_server::{self, ConnectionLimits};
use spillway_tests::pki::Pki;
use spillway_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_serves_https_to_clients_that_trust_it() {
    let pki = Pki::new("tls-termination");
    let certs = pki.server_cert();
    let sim = tiers_a_and_b().await;
    let tls = TlsConfig {
        cert_file: certs.cert.clone(),
        key_file: certs.key.clone(),
    };
    let config = Config::from_toml(&backend(&sim, "a", 1)).unwrap();
    let gateway = Arc::new(
        Gateway::from_config(&config, Arc::new(spillway_shared::EmbeddedState::default())).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(http_server::serve_tls(
        listener,
        app(gateway),
        ConnectionLimits::default(),
        spillway_gateway::edge::tls::acceptor(&tls).unwrap(),
        std::future::pending(),
    ));
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&certs.ca).unwrap()).unwrap();
    let trusting = |http1: bool| {
        let builder = reqwest::Client::builder().tls_certs_only([ca.clone()]);
        let builder = if http1 { builder.http1_only() } else { builder };
        builder.build().unwrap()
    };
    let url = format!(
        "https://127.0.0.1:{port}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    );

    for (http1, version) in [
        (false, reqwest::Version::HTTP_2),
        (true, reqwest::Version::HTTP_11),
    ] {
        let answer = trusting(http1)
            .post(&url)
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.version(), version);
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
    }
    // Streams too.
    let stream = trusting(false)
        .post(&url)
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert!(stream.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    // Plain HTTP to the TLS port, and a client that does not trust the CA: no answer.
    let plain = client()
        .post(format!(
            "http://127.0.0.1:{port}/openai/deployments/gpt-4o/chat/completions"
        ))
        .json(&chat_body(false))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    let untrusting = reqwest::Client::builder()
        .tls_certs_only([])
        .build()
        .unwrap()
        .post(&url)
        .json(&chat_body(false))
        .send()
        .await;
    assert!(untrusting.is_err());
    assert_eq!(sim.stats("a", "gpt-4o").requests, 3);
}

#[test]
fn a_key_that_is_not_the_certificates_is_a_configuration_problem() {
    let pki = Pki::new("tls-mismatch");
    let certs = pki.server_cert();
    let ca_key = pki.path("ca.key");
    let config = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[[backends]]\nid = \"a\"\nurl = \"http://127.0.0.1:1\"\ndeployments = {{ \"gpt-4o\" = \"d\" }}\n",
        certs.cert.display(),
        ca_key.display()
    );
    let problems = Config::from_toml(&config)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        problems.contains("server.tls") && problems.contains("do not make a TLS identity"),
        "{problems}"
    );
    let missing = config.replace(&ca_key.display().to_string(), "/nonexistent/key.pem");
    let problems = Config::from_toml(&missing)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(problems.contains("/nonexistent/key.pem"), "{problems}");
}
