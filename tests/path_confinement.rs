//! Path confinement: a client that may only reach pool `gpt-4o` cannot walk the upstream
//! path to another deployment (or anywhere else on the resource), however it spells `..`.
//! Every variant gets 400 `invalid_path` on both routes, over HTTP/1.1 and HTTP/2, and not a
//! single request reaches the simulated resource.

use spillway_gateway::sim::{DeploymentKind, SimHandle};
use spillway_tests::wire::{self, WireResponse};
use spillway_tests::*;

const QUERY: &str = "?api-version=2024-10-21";

/// Operation paths as an attacker writes them (after `/openai/deployments/gpt-4o/` or
/// `/openai/v1/`), aiming at deployment `emb-ptu` of the same resource.
const TRAVERSALS: [&str; 18] = [
    "../../deployments/emb-ptu/embeddings",
    "./embeddings",
    "%2e%2e/%2e%2e/deployments/emb-ptu/embeddings",
    "%2E%2E/%2E%2E/deployments/emb-ptu/embeddings",
    "%2e./%2E./deployments/emb-ptu/embeddings",
    "%252e%252e/%252e%252e/deployments/emb-ptu/embeddings",
    "..%2f..%2fdeployments%2femb-ptu%2fembeddings",
    "..%2F..%2Fdeployments/emb-ptu/embeddings",
    "chat%2fcompletions",
    "..%5c..%5cdeployments%5cemb-ptu%5cembeddings",
    "..;/..;/deployments/emb-ptu/embeddings",
    "chat/completions;v=1",
    "/chat/completions",
    "chat//completions",
    "embeddings/",
    "embeddings.",
    "../../deployments/emb-ptu/embeddings...",
    "%c0%ae%c0%ae/%c0%ae%c0%ae/deployments/emb-ptu/embeddings",
];

/// Pool `gpt-4o` and, on the same resource, deployment `emb-ptu` of another pool.
async fn setup() -> (SimHandle, Replica) {
    let sim = start_sim(vec![resource(
        "ptu",
        vec![
            instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000),
            instant_deployment("emb-ptu", DeploymentKind::Ptu, 1_000_000),
        ],
    )])
    .await;
    let config = format!(
        "[[backends]]\nid = \"ptu\"\nurl = \"{}\"\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\", \"emb\" = \"emb-ptu\" }}\n",
        sim.url("ptu")
    );
    let gw = start_single(&config).await;
    (sim, gw)
}

fn targets() -> Vec<(String, String)> {
    let body = r#"{"model":"gpt-4o","input":"hi","messages":[{"role":"user","content":"hi"}]}"#;
    let mut targets = Vec::new();
    for op in TRAVERSALS {
        targets.push((
            format!("/openai/deployments/gpt-4o/{op}{QUERY}"),
            body.to_owned(),
        ));
        targets.push((format!("/openai/v1/{op}"), body.to_owned()));
        targets.push((format!("/v1/{op}"), body.to_owned()));
    }
    // The deployment name itself as a way out.
    for pool in [
        "..",
        "%2e%2e",
        "gpt-4o%2f..%2f..%2fdeployments%2femb-ptu",
        "gpt-4o.",
    ] {
        targets.push((
            format!("/openai/deployments/{pool}/embeddings{QUERY}"),
            body.to_owned(),
        ));
    }
    targets
}

fn assert_refused(response: &WireResponse, target: &str, protocol: &str) {
    assert_eq!(response.status, 400, "{protocol} {target}: {response:?}");
    assert_eq!(
        response.error_code(),
        "invalid_path",
        "{protocol} {target}: an Azure-shaped error naming the path"
    );
}

#[tokio::test]
async fn traversal_variants_are_400_over_http1_and_nothing_reaches_upstream() {
    let (sim, gw) = setup().await;
    for (target, body) in targets() {
        let request = wire::post_head(&target, body.len(), "") + &body;
        let response = wire::http1(&gw.url, request.as_bytes()).await;
        assert_refused(&response, &target, "HTTP/1.1");
    }
    assert_eq!(sim.received("ptu").len(), 0, "{:?}", sim.received("ptu"));

    // The same connection type with an ordinary path is served: the refusals are the rule's.
    let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    let target = format!("/openai/deployments/gpt-4o/chat/completions{QUERY}");
    let request = wire::post_head(&target, body.len(), "") + body;
    assert_eq!(wire::http1(&gw.url, request.as_bytes()).await.status, 200);
    let received = sim.received("ptu");
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].path_and_query,
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    );
}

#[tokio::test]
async fn traversal_variants_are_400_over_http2_and_nothing_reaches_upstream() {
    let (sim, gw) = setup().await;
    for (target, body) in targets() {
        let response = wire::http2_post(&gw.url, &target, &body).await;
        assert_refused(&response, &target, "HTTP/2");
    }
    assert_eq!(sim.received_total(), 0, "{:?}", sim.received("ptu"));

    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    let response = wire::http2_post(&gw.url, "/openai/v1/chat/completions", body).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        sim.received("ptu")[0].path_and_query,
        "/openai/v1/chat/completions"
    );
}

/// Only the parameters the operation defines reach the backend, re-encoded from their pairs
/// and each once: a client cannot name another deployment, a key, or anything else.
#[tokio::test]
async fn the_upstream_query_holds_only_the_operations_parameters() {
    let (sim, gw) = setup().await;
    let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    let target = "/openai/deployments/gpt-4o/chat/completions?api-version=2024%2D10%2D21&foo=bar&deployment=emb-ptu&api-key=x&Deployment=y&api-version=1999-01-01&x";
    let request = wire::post_head(target, body.len(), "") + body;
    assert_eq!(wire::http1(&gw.url, request.as_bytes()).await.status, 200);
    assert_eq!(
        sim.received("ptu")[0].path_and_query,
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    );
}
