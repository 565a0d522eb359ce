//! `rediss://`: the Redis store over TLS, as Azure Cache for Redis requires. A self-signed
//! certificate for 127.0.0.1 is made with `openssl` and trusted through `SSL_CERT_FILE`; its
//! own binary because it sets that process-wide variable.

use std::time::Duration;

use spillway_shared::{Admission, BackendId, Candidate, FleetState, PoolName, RedisState, Windows};
use spillway_tests::pki::Pki;
use spillway_tests::redis_server::RedisServer;

#[test]
fn the_store_works_over_tls() {
    let pki = Pki::new("redis-tls");
    let certs = pki.server_cert();
    let text = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (ca, cert, key) = (text(&certs.ca), text(&certs.cert), text(&certs.key));
    let cert_for_env = ca.clone();
    // SAFETY: set before any other thread exists; the TLS client reads it when connecting.
    unsafe { std::env::set_var("SSL_CERT_FILE", &cert_for_env) };

    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let _server = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--port",
        "0",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let url = format!("rediss://127.0.0.1:{tls_port}");
        let store = RedisState::new(
            &url,
            "spillway-tls",
            Windows::default(),
            Duration::from_secs(2),
        )
        .unwrap();
        store
            .ready(Duration::from_secs(10))
            .await
            .expect("TLS connection");
        let candidates = [Candidate::unlimited(BackendId::new("a"))];
        let answer = store
            .acquire(&PoolName::new("tls"), &candidates, 1)
            .await
            .unwrap();
        assert!(matches!(answer, Admission::Admitted { .. }));
    });
}
