//! Keys: clients authenticate with their own key, which is never forwarded; each backend gets
//! the gateway's credential for it. Its own test binary because it sets environment variables.

use std::sync::Once;

use futures_util::StreamExt;
use serde_json::Value;
use spillway_gateway::sim::{DeploymentKind, ResourceSpec};
use spillway_tests::*;

const CLIENT_KEY: &str = "client-key-123";
const BACKEND_KEY: &str = "backend-key-456";

fn set_keys() {
    static ONCE: Once = Once::new();
    // SAFETY: set once, before any test in this binary reads the environment.
    ONCE.call_once(|| unsafe {
        std::env::set_var("SPILLWAY_TEST_CLIENT_KEY", CLIENT_KEY);
        std::env::set_var("SPILLWAY_TEST_BACKEND_KEY", BACKEND_KEY);
        std::env::set_var("SPILLWAY_TEST_WRONG_BACKEND_KEY", "not-the-key");
        std::env::set_var("SPILLWAY_TEST_EU_KEY", "eu-app-key");
    });
}

fn keyed(name: &str) -> ResourceSpec {
    ResourceSpec {
        api_key: Some(BACKEND_KEY.into()),
        ..resource(
            name,
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        )
    }
}

fn keyed_backend(
    sim: &spillway_gateway::sim::SimHandle,
    id: &str,
    priority: u32,
    env: &str,
) -> String {
    backend(sim, id, priority).replace(
        "deployments =",
        &format!("auth = {{ type = \"api-key\", env = \"{env}\" }}\ndeployments ="),
    )
}

const CONSUMER: &str =
    "[[consumers]]\nname = \"chat-app\"\nkey_env = \"SPILLWAY_TEST_CLIENT_KEY\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_need_a_valid_key_and_the_backend_gets_its_own() {
    set_keys();
    let sim = start_sim(vec![keyed("ptu")]).await;
    let gw = start_single(&(keyed_backend(&sim, "ptu", 1, "SPILLWAY_TEST_BACKEND_KEY") + CONSUMER))
        .await;
    let url = format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        gw.url
    );
    let body = chat_body(false);

    for request in [
        client().post(&url),
        client().post(&url).header("api-key", "wrong"),
    ] {
        let r = request.json(&body).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(header(&r, "x-spillway-backend"), "none");
        assert_eq!(header(&r, "x-spillway-attempts"), "0");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["code"], "401");
    }
    assert_eq!(sim.stats("ptu", "gpt-4o").requests, 0);

    // The simulator only accepts BACKEND_KEY: success means the client key was replaced.
    let r = client()
        .post(&url)
        .header("api-key", CLIENT_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .post(&url)
        .bearer_auth(CLIENT_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sim.stats("ptu", "gpt-4o").succeeded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_configured_by_key_hash_is_admitted_by_its_key_only() {
    set_keys();
    let sim = start_sim(vec![keyed("ptu")]).await;
    // `printf hashed-key-789 | sha256sum`: the key itself is nowhere in the configuration.
    let hashed = "[[consumers]]\nname = \"hashed-app\"\nkey_sha256 = \"5372915705805b76231808126c6338a64d9e8c4c1312239c284c810864493055\"\n";
    let gw = start_single(
        &(keyed_backend(&sim, "ptu", 1, "SPILLWAY_TEST_BACKEND_KEY") + CONSUMER + hashed),
    )
    .await;
    let send = |key: &'static str| chat_as(&gw, key);
    assert_eq!(send("hashed-key-789").await.unwrap().status(), 200);
    assert_eq!(
        send(CLIENT_KEY).await.unwrap().status(),
        200,
        "env keys too"
    );
    let wrong = send("5372915705805b76231808126c6338a64d9e8c4c1312239c284c810864493055")
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401, "the hash is not a key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_rejecting_the_gateway_credential_is_failed_over() {
    set_keys();
    let sim = start_sim(vec![keyed("ptu"), keyed("payg")]).await;
    let config = keyed_backend(&sim, "ptu", 1, "SPILLWAY_TEST_WRONG_BACKEND_KEY")
        + &keyed_backend(&sim, "payg", 2, "SPILLWAY_TEST_BACKEND_KEY");
    let gw = start_single(&config).await;

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-spillway-backend"), "payg");
    assert_eq!(header(&r, "x-spillway-attempts"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eu_only_consumer_never_reaches_a_us_member_even_when_saturated() {
    set_keys();
    let sim = start_sim(vec![
        ResourceSpec {
            region: Some("swedencentral".into()),
            ..resource(
                "eu",
                vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
            )
        },
        ResourceSpec {
            region: Some("eastus".into()),
            ..resource(
                "us",
                vec![instant_deployment(
                    "gpt-4o",
                    DeploymentKind::Payg,
                    1_000_000,
                )],
            )
        },
    ])
    .await;
    let regions =
        |b: String, r: &str| b.replace("priority =", &format!("region = \"{r}\"\npriority ="));
    let config = regions(backend(&sim, "eu", 1), "swedencentral")
        + &regions(backend(&sim, "us", 2), "eastus")
        + CONSUMER
        + "[[consumers]]\nname = \"eu-app\"\nkey_env = \"SPILLWAY_TEST_EU_KEY\"\nregions = [\"swedencentral\", \"francecentral\"]\n";
    let gw = start_single(&config).await;
    let send = |key: &'static str| chat_as(&gw, key);

    force(&sim, "eu", 429, Some(5_000), None, None);
    for _ in 0..3 {
        let r = send("eu-app-key").await.unwrap();
        assert_eq!(r.status(), 429, "refused rather than served outside the EU");
    }
    assert_eq!(sim.stats("us", "gpt-4o").requests, 0);
    // Another consumer without the restriction spills over to the US as usual.
    let r = send(CLIENT_KEY).await.unwrap();
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-spillway-backend")),
        (200, "us")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_the_pools_a_consumer_may_use() {
    set_keys();
    let sim = start_sim(vec![ResourceSpec {
        region: Some("eastus".into()),
        ..resource(
            "us",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        )
    }])
    .await;
    let config = backend(&sim, "us", 1).replace("priority =", "region = \"eastus\"\npriority =")
        + CONSUMER
        + "[[consumers]]\nname = \"eu-app\"\nkey_env = \"SPILLWAY_TEST_EU_KEY\"\nregions = [\"swedencentral\"]\n";
    let gw = start_single(&config).await;
    let list = |path: &'static str, key: &'static str| {
        client()
            .get(format!("{}{path}", gw.url))
            .header("api-key", key)
            .send()
    };

    let models: Value = list("/openai/v1/models", CLIENT_KEY)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o"]);
    let one = list("/v1/models/gpt-4o", CLIENT_KEY).await.unwrap();
    assert_eq!(one.status(), 200);

    // The EU-only consumer may use no member of the pool: it is not listed, nor found.
    let eu: Value = list("/v1/models", "eu-app-key")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(eu["data"], serde_json::json!([]));
    assert_eq!(
        list("/openai/v1/models/gpt-4o", "eu-app-key")
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(list("/v1/models", "wrong").await.unwrap().status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_session_needs_a_key_and_the_backend_gets_its_own() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    set_keys();
    let sim = start_sim(vec![keyed("ptu")]).await;
    let gw = start_single(&(keyed_backend(&sim, "ptu", 1, "SPILLWAY_TEST_BACKEND_KEY") + CONSUMER))
        .await;
    let url = format!(
        "{}/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o",
        gw.url.replacen("http://", "ws://", 1)
    );
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_eq!(sim.stats("ptu", "gpt-4o").requests, 0);

    // The simulator only accepts BACKEND_KEY: an open session means the key was replaced.
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("api-key", CLIENT_KEY.parse().unwrap());
    let (mut session, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the session opens");
    let first = session.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("session.created"));
    let handshake = sim
        .received("ptu")
        .into_iter()
        .find(|r| r.path_and_query.starts_with("/openai/realtime"))
        .expect("the upstream handshake");
    assert!(
        handshake
            .headers
            .iter()
            .all(|(_, v)| !v.contains(CLIENT_KEY)),
        "the client's key never goes upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_keeps_to_its_pools_and_its_per_request_limits() {
    set_keys();
    let sim = start_sim(vec![keyed("ptu")]).await;
    // `printf limited-key | sha256sum`, `printf capped-key | sha256sum`.
    let consumers = "[[consumers]]\nname = \"limited\"\npools = [\"gpt-4o-mini\"]\n\
        key_sha256 = \"f33b2500796d61f96eeef0f5331ddc40c17e434aff139f4d9e00bfe75170d87a\"\n\
        [[consumers]]\nname = \"capped\"\nmax_prompt_tokens = 50\nmax_tokens = 16\n\
        key_sha256 = \"ab2c905d85cdd432930468fb5c95a31eb95b3142cf345007019d990f8b2fa14a\"\n";
    let gw =
        start_single(&(keyed_backend(&sim, "ptu", 1, "SPILLWAY_TEST_BACKEND_KEY") + consumers))
            .await;
    let url = format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        gw.url
    );
    let send = |key: &'static str, body: Value| {
        client()
            .post(&url)
            .header("api-key", key)
            .json(&body)
            .send()
    };
    let code = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_owned(),
        )
    };

    // A pool outside the consumer's list: 404 as for a pool that does not exist (a key
    // cannot enumerate pools), nothing sent upstream, not listed.
    let refused = send("limited-key", chat_body(false)).await.unwrap();
    assert_eq!(code(refused).await, (404, "DeploymentNotFound".to_owned()));
    assert_eq!(sim.stats("ptu", "gpt-4o").requests, 0);
    let models: Value = client()
        .get(format!("{}/openai/v1/models", gw.url))
        .header("api-key", "limited-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"], serde_json::json!([]));

    // Per-request limits: the output cap must be asked for, within the limit; the prompt too.
    let ask = |max_tokens: Option<u64>, text: &str| {
        let mut body = serde_json::json!({ "messages": [{ "role": "user", "content": text }] });
        if let Some(n) = max_tokens {
            body["max_tokens"] = n.into();
        }
        body
    };
    assert_eq!(
        send("capped-key", ask(Some(8), "Hello"))
            .await
            .unwrap()
            .status(),
        200
    );
    // Three choices of 8 tokens each ask for 24, over the key's 16.
    let mut three = ask(Some(8), "Hello");
    three["n"] = 3.into();
    for body in [
        ask(None, "Hello"),
        ask(Some(32), "Hello"),
        ask(Some(8), &"word ".repeat(100)),
        three,
    ] {
        let (status, error) = code(send("capped-key", body).await.unwrap()).await;
        assert_eq!((status, error.as_str()), (400, "invalid_request"));
    }
    assert_eq!(
        sim.stats("ptu", "gpt-4o").requests,
        1,
        "refusals never go upstream"
    );
}
