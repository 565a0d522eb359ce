//! Entra ID credentials for backends beyond the managed identity: AKS workload identity (a
//! federated service account token exchanged at the Entra authority, played here over TLS on
//! loopback) and the developer's Azure CLI login (a stand-in `az` on `PATH`). Backends sharing
//! an identity share its token: one fetch serves them all. Its own binary: it sets process
//! environment variables (`SSL_CERT_FILE`, `PATH`, the `AZURE_*` the AKS webhook injects).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use spillway_gateway::sim::{DeploymentKind, ResourceSpec};
use spillway_tests::pki::Pki;
use spillway_tests::*;

const SERVICE_ACCOUNT_TOKEN: &str = "eyJ.service-account.token";
const WORKLOAD_TOKEN: &str = "workload-token-123";
const CLI_TOKEN: &str = "cli-token-456";

#[derive(Default)]
struct Authority {
    calls: AtomicU32,
}

/// `POST /{tenant}/oauth2/v2.0/token`: the client-assertion grant workload identity makes.
async fn token(
    State(authority): State<Arc<Authority>>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    authority.calls.fetch_add(1, Ordering::SeqCst);
    let field = |name: &str| form.get(name).map(String::as_str);
    let expected = [
        ("client_assertion", SERVICE_ACCOUNT_TOKEN),
        ("client_id", "workload-client"),
        ("grant_type", "client_credentials"),
        ("scope", "https://cognitiveservices.azure.com/.default"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
    ];
    if tenant != "tenant-1" || expected.iter().any(|(k, v)| field(k) != Some(v)) {
        return (
            StatusCode::BAD_REQUEST,
            format!("unexpected grant: {form:?}"),
        )
            .into_response();
    }
    axum::Json(serde_json::json!({
        "token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600,
        "access_token": WORKLOAD_TOKEN,
    }))
    .into_response()
}

fn protected(name: &str, token: &str) -> ResourceSpec {
    ResourceSpec {
        api_key: Some(token.into()),
        ..resource(
            name,
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        )
    }
}

fn with_auth(backend: String, auth: &str) -> String {
    backend.replace("deployments =", &format!("auth = {auth}\ndeployments ="))
}

#[test]
fn workload_identity_and_azure_cli_tokens_authenticate_backends() {
    let pki = Pki::new("identities");
    let certs = pki.server_cert();
    let token_file = pki.path("service-account-token");
    std::fs::write(&token_file, SERVICE_ACCOUNT_TOKEN).unwrap();
    // A stand-in Azure CLI: counts its calls and prints what `az account get-access-token
    // -o json` prints.
    let az_calls = pki.path("az-calls");
    let az = pki.path("az");
    std::fs::write(
        &az,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\n\
             printf '{{\"accessToken\":\"{CLI_TOKEN}\",\"expires_on\":%s,\"tokenType\":\"Bearer\"}}' $(( $(date +%s) + 3600 ))\n",
            az_calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&az, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let authority_url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    // SAFETY: no other thread exists yet; the credentials read these when they are built.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", &certs.ca);
        std::env::set_var("AZURE_AUTHORITY_HOST", &authority_url);
        std::env::set_var("AZURE_TENANT_ID", "tenant-1");
        std::env::set_var("AZURE_CLIENT_ID", "workload-client");
        std::env::set_var("AZURE_FEDERATED_TOKEN_FILE", &token_file);
        let path = std::env::var("PATH").unwrap_or_default();
        std::env::set_var("PATH", format!("{}:{path}", pki.dir().display()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let authority = Arc::new(Authority::default());
        let app = axum::Router::new()
            .route("/{tenant}/oauth2/v2.0/token", axum::routing::post(token))
            .with_state(authority.clone());
        let tls = spillway_gateway::edge::tls::acceptor(&spillway_gateway::config::TlsConfig {
            cert_file: certs.cert.clone(),
            key_file: certs.key.clone(),
        })
        .unwrap();
        tokio::spawn(spillway_gateway::edge::http_server::serve_tls(
            tokio::net::TcpListener::from_std(listener).unwrap(),
            app,
            Default::default(),
            tls,
            std::future::pending(),
        ));

        let sim = start_sim(vec![
            protected("east", WORKLOAD_TOKEN),
            protected("west", WORKLOAD_TOKEN),
            protected("laptop", CLI_TOKEN),
        ])
        .await;

        // Two backends with the pod's workload identity, each with budget for one request
        // (17 tokens) in the window: two requests use both, and one token serves both.
        let workload = "{ type = \"workload-identity\" }\ntpm = 20";
        let config = with_auth(backend(&sim, "east", 1), workload)
            + &with_auth(backend(&sim, "west", 1), workload);
        let gw = start_single(&config).await;
        for _ in 0..2 {
            let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
        for resource in ["east", "west"] {
            assert_eq!(sim.stats(resource, "gpt-4o").requests, 1, "{resource}");
        }
        assert_eq!(
            authority.calls.load(Ordering::SeqCst),
            1,
            "one token for the identity"
        );

        // A developer's Azure CLI login.
        let config = with_auth(backend(&sim, "laptop", 1), "{ type = \"azure-cli\" }");
        let gw = start_single(&config).await;
        for _ in 0..3 {
            let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
        let calls = std::fs::read_to_string(&az_calls).unwrap();
        assert_eq!(calls.lines().count(), 1, "the CLI token is cached: {calls}");
        assert!(
            calls.contains("--scope https://cognitiveservices.azure.com/.default"),
            "{calls}"
        );
    });
}
