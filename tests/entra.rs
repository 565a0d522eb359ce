//! Entra ID backend credentials: the managed identity's token is fetched (App Service
//! identity endpoint, played on loopback), cached, sent as a bearer token, and a token
//! failure fails the request over. Its own binary: it sets process environment variables.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use spillway_gateway::sim::{DeploymentKind, ResourceSpec};
use spillway_tests::*;

const TOKEN: &str = "entra-token-abc";
const IDENTITY_HEADER: &str = "identity-header-secret";

#[derive(Default)]
struct TokenServer {
    calls: AtomicU32,
    failing: AtomicBool,
}

async fn token(
    State(server): State<Arc<TokenServer>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    server.calls.fetch_add(1, Ordering::SeqCst);
    let header_ok = headers
        .get("x-identity-header")
        .is_some_and(|v| v == IDENTITY_HEADER);
    if server.failing.load(Ordering::SeqCst) || !header_ok {
        return (StatusCode::INTERNAL_SERVER_ERROR, "identity endpoint down").into_response();
    }
    assert_eq!(
        q.get("resource").map(String::as_str),
        Some("https://cognitiveservices.azure.com")
    );
    let expires_on = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600)
        .to_string();
    axum::Json(serde_json::json!({
        "access_token": TOKEN, "expires_on": expires_on, "token_type": "Bearer",
        "resource": "https://cognitiveservices.azure.com",
    }))
    .into_response()
}

#[test]
fn managed_identity_tokens_authenticate_backends_and_failures_fail_over() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}/token", listener.local_addr().unwrap());
    // SAFETY: no other thread exists yet; the credential reads these when it is built.
    unsafe {
        std::env::set_var("IDENTITY_ENDPOINT", &endpoint);
        std::env::set_var("IDENTITY_HEADER", IDENTITY_HEADER);
        std::env::remove_var("IDENTITY_SERVER_THUMBPRINT");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let server = Arc::new(TokenServer::default());
        let app = axum::Router::new()
            .route("/token", axum::routing::get(token))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        // The PTU resource accepts only the Entra token; PAYG needs no credential.
        let ptu = ResourceSpec {
            api_key: Some(TOKEN.into()),
            ..resource(
                "ptu",
                vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
            )
        };
        let payg = resource(
            "payg",
            vec![instant_deployment(
                "gpt-4o",
                DeploymentKind::Payg,
                1_000_000,
            )],
        );
        let sim = start_sim(vec![ptu, payg]).await;
        let config = backend(&sim, "ptu", 1).replace(
            "deployments =",
            "auth = { type = \"managed-identity\" }\ndeployments =",
        ) + &backend(&sim, "payg", 2);

        let gw = start_single(&config).await;
        for _ in 0..2 {
            let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
            assert_eq!(r.status(), 200);
            assert_eq!(
                header(&r, "x-spillway-backend"),
                "ptu",
                "the bearer token was accepted"
            );
        }
        assert_eq!(
            server.calls.load(Ordering::SeqCst),
            1,
            "the token is cached between requests"
        );

        // A fresh replica (empty token cache) whose identity endpoint fails: fail over.
        server.failing.store(true, Ordering::SeqCst);
        let gw = start_single(&config).await;
        let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-spillway-backend"), "payg");
        assert_eq!(header(&r, "x-spillway-attempts"), "2");
        assert_eq!(
            sim.stats("ptu", "gpt-4o").requests,
            2,
            "no request reached PTU without a token"
        );
    });
}
