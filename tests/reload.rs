//! Reloading the configuration (`POST /admin/reload`, as SIGHUP) under load: backends,
//! pools and consumers change for the requests that arrive after it, every request in
//! flight is answered, an invalid file is refused naming the key and the running
//! configuration stays, and what only a restart can change is refused.

use std::sync::Arc;

use spillway_gateway::Gateway;
use spillway_gateway::app::{admin_live, app_live};
use spillway_gateway::config::Config;
use spillway_gateway::live::Live;
use spillway_shared::{EmbeddedState, FleetState};
use spillway_tests::*;

struct Served {
    url: String,
    admin: String,
}

async fn serve(live: Arc<Live>) -> Served {
    let data = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served = Served {
        url: format!("http://{}", data.local_addr().unwrap()),
        admin: format!("http://{}/admin/reload", admin.local_addr().unwrap()),
    };
    for (listener, router) in [(data, app_live(live.clone())), (admin, admin_live(live))] {
        tokio::spawn(spillway_gateway::edge::http_server::serve(
            listener,
            router,
            Default::default(),
            std::future::pending(),
        ));
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_changes_routing_and_drops_nothing() {
    let sim = tiers_a_and_b().await;
    let dir = std::env::temp_dir().join(format!("spillway-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("spillway.toml");
    // A: only backend a. B: b joins at a better tier, so new requests go to b.
    let only_a = backend(&sim, "a", 2);
    let a_and_b = backend(&sim, "a", 2) + &backend(&sim, "b", 1);
    std::fs::write(&path, &only_a).unwrap();

    let fleet: Arc<dyn FleetState> = Arc::new(EmbeddedState::default());
    let config = Config::load(Some(&path)).unwrap();
    let gateway = Arc::new(Gateway::from_config(&config, fleet.clone()).unwrap());
    let live = Live::new(gateway, Some(path.clone()), fleet);
    let served = serve(live.clone()).await;
    let replica_url = served.url.clone();
    let http = client();
    let reload = || {
        http.post(&served.admin)
            .header("content-type", "application/json")
            .body("{}")
            .send()
    };
    // A cross-site form post (no JSON content type) reloads nothing.
    let form = http
        .post(&served.admin)
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 415);
    let backend_of = async |url: &str| {
        let r = client()
            .post(format!(
                "{url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
            ))
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        header(&r, "x-spillway-backend").to_owned()
    };
    assert_eq!(backend_of(&replica_url).await, "a");

    // Load on one side; on the other, reloads back and forth, each once the load has
    // reached the member the previous one brought in.
    let load = {
        let bases = vec![replica_url.clone()];
        tokio::spawn(async move { offer_load_to(&bases, 600, 16).await })
    };
    let served_by = |resource: &'static str, at_least: u64| {
        sim.wait_until(EVENT_TIMEOUT, move |sim| {
            sim.stats(resource, "gpt-4o").requests >= at_least
        })
    };
    for round in 0..4u64 {
        let (next, now_on, count) = if round % 2 == 0 {
            (&a_and_b, "b", 20 * (round / 2 + 1))
        } else {
            (&only_a, "a", 20 * (round / 2 + 2))
        };
        std::fs::write(&path, next).unwrap();
        let answer = reload().await.unwrap();
        assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
        assert!(
            served_by(now_on, count).await,
            "round {round}: {now_on} serves the load"
        );
    }
    let statuses = load.await.unwrap();
    assert_eq!(statuses.len(), 600);
    assert!(
        statuses.iter().all(|&s| s == 200),
        "no request dropped: {statuses:?}"
    );

    // The last reload (only a) is in force; then b joins again.
    assert_eq!(backend_of(&replica_url).await, "a");
    std::fs::write(&path, &a_and_b).unwrap();
    assert_eq!(reload().await.unwrap().status(), 200);
    assert_eq!(backend_of(&replica_url).await, "b");

    // An invalid file is refused, naming the key; the running configuration stays.
    std::fs::write(&path, a_and_b.replace("priority = 1", "priority = 0")).unwrap();
    let refused = reload().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("backends[1].priority"), "{message}");
    assert_eq!(backend_of(&replica_url).await, "b");

    // Consumers reload too: a key is required from now on.
    let keyed = a_and_b.clone()
        + &format!(
            "[[consumers]]\nname = \"app\"\nkey_sha256 = \"{}\"\n",
            spillway_gateway::auth::consumers::key_sha256_hex("reload-key")
        );
    std::fs::write(&path, &keyed).unwrap();
    assert_eq!(reload().await.unwrap().status(), 200);
    let chat =
        format!("{replica_url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let anonymous = http
        .post(&chat)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let keyed_answer = http
        .post(&chat)
        .header("api-key", "reload-key")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(keyed_answer.status(), 200);

    // Listeners and the state store need a restart.
    std::fs::write(&path, keyed.clone() + "[state]\nwindow_ms = 1000\n").unwrap();
    let refused = reload().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("state: changes need a restart"),
        "{body}"
    );
    // So does what the connection loop and the replica's body budget were built with.
    std::fs::write(
        &path,
        keyed.clone() + "[server]\nmax_inflight_body_bytes = 33554432\nidle_timeout_ms = 1000\n",
    )
    .unwrap();
    let refused = reload().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("server.max_inflight_body_bytes")
            && message.contains("server.idle_timeout_ms"),
        "{body}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
