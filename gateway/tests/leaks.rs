//! No secret leaves the gateway. `spillway serve` runs as operators run it, with logs at
//! debug and traces exported over OTLP, against Redis with a password, backends with API keys
//! (one of them wrong) and a managed identity token, consumers with keys, an admin token, and
//! Entra ID clients. Requests good and bad are sent, the admin listener (`/metrics`,
//! `/admin/state`, `/admin/config`) and `spillway state` (table and JSON) are read, Redis is killed mid-run; then everything the gateway wrote (its logs, the spans
//! it exported, every answer's headers and body, `spillway state`'s output) is searched for
//! every secret.

mod common;

use common::{KillOnDrop, free_port, redis_server, sigterm};

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use spillway_gateway::sim::{self, DeploymentKind, DeploymentSpec, ResourceSpec, SimConfig};

const CLIENT_KEY: &str = "client-key-leakcheck-a1";
const BACKEND_KEY: &str = "backend-key-leakcheck-b2";
const WRONG_BACKEND_KEY: &str = "wrong-backend-key-leakcheck-c3";
const ADMIN_TOKEN: &str = "admin-token-leakcheck-d4";
const REDIS_PASSWORD: &str = "redis-password-leakcheck-e5";
const MI_TOKEN: &str = "managed-identity-token-leakcheck-f6";
const IDENTITY_HEADER: &str = "identity-header-leakcheck-g7";
/// Shaped like a JWT, so it is checked as an Entra ID token (and refused).
const CLIENT_JWT: &str =
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJsZWFrY2hlY2siOiJoOCJ9.c2lnbmF0dXJlLWxlYWtjaGVjay1oOA";

const SECRETS: [&str; 8] = [
    CLIENT_KEY,
    BACKEND_KEY,
    WRONG_BACKEND_KEY,
    ADMIN_TOKEN,
    REDIS_PASSWORD,
    MI_TOKEN,
    IDENTITY_HEADER,
    CLIENT_JWT,
];

/// Everything received on the loopback "collector" and identity endpoint.
#[derive(Default)]
struct Received {
    spans: Mutex<Vec<Vec<u8>>>,
    exported: tokio::sync::Notify,
}

async fn export(State(r): State<Arc<Received>>, body: Bytes) -> &'static str {
    r.spans.lock().unwrap().push(body.to_vec());
    r.exported.notify_one();
    ""
}

async fn identity(headers: axum::http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    if headers
        .get("x-identity-header")
        .is_none_or(|v| v != IDENTITY_HEADER)
    {
        return axum::http::StatusCode::UNAUTHORIZED.into_response();
    }
    let expires_on = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600)
        .to_string();
    axum::Json(serde_json::json!({
        "access_token": MI_TOKEN, "expires_on": expires_on, "token_type": "Bearer",
        "resource": "https://cognitiveservices.azure.com",
    }))
    .into_response()
}

fn resource(name: &str, key: &str) -> ResourceSpec {
    ResourceSpec {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: Some(key.into()),
        region: None,
        deployments: vec![DeploymentSpec {
            ttft_ms: 0,
            ms_per_token: 0,
            ..DeploymentSpec::new("gpt-4o", DeploymentKind::Ptu, 1_000_000)
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_in_anything_the_gateway_writes() {
    let received = Arc::new(Received::default());
    let helpers = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .route("/identity", axum::routing::get(identity))
        .with_state(received.clone());
    let helper_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let helper = format!("http://{}", helper_listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(helper_listener, helpers).await.unwrap() });

    let sim = sim::start(SimConfig {
        resources: vec![
            resource("wrong-key", BACKEND_KEY),
            resource("keyed", BACKEND_KEY),
            resource("identity", MI_TOKEN),
        ],
    })
    .await
    .unwrap();

    let dir = std::env::temp_dir().join(format!("spillway-leaks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (redis, redis_port) = redis_server(&dir, &["--requirepass", REDIS_PASSWORD]);
    std::fs::write(dir.join("jwks.json"), r#"{"keys":[]}"#).unwrap();

    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nadmin_token_env = \"LEAK_ADMIN_TOKEN\"\n\
         [state]\nredis_url = \"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}\"\n\
         [telemetry]\notlp_endpoint = \"{helper}/v1/traces\"\n\
         [auth.jwt]\nissuer = \"https://login.microsoftonline.com/t/v2.0\"\naudiences = [\"api://spillway\"]\njwks_file = \"{}\"\n\
         [[consumers]]\nname = \"chat-app\"\nkey_env = \"LEAK_CLIENT_KEY\"\n\
         [[consumers]]\nname = \"entra-app\"\nclient_id = \"app-1\"\n\
         [[backends]]\nid = \"wrong-key\"\npriority = 1\nurl = \"{}\"\nauth = {{ type = \"api-key\", env = \"LEAK_WRONG_BACKEND_KEY\" }}\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n\
         [[backends]]\nid = \"identity\"\npriority = 2\nurl = \"{}\"\nauth = {{ type = \"managed-identity\" }}\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n\
         [[backends]]\nid = \"keyed\"\npriority = 3\nurl = \"{}\"\nauth = {{ type = \"api-key\", env = \"LEAK_BACKEND_KEY\" }}\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n",
        dir.join("jwks.json").display(),
        sim.url("wrong-key"),
        sim.url("identity"),
        sim.url("keyed"),
    );
    let config_path = dir.join("spillway.toml");
    std::fs::write(&config_path, config).unwrap();
    let spillway = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
        command
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .env("LEAK_CLIENT_KEY", CLIENT_KEY)
            .env("LEAK_BACKEND_KEY", BACKEND_KEY)
            .env("LEAK_WRONG_BACKEND_KEY", WRONG_BACKEND_KEY)
            .env("LEAK_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("IDENTITY_ENDPOINT", format!("{helper}/identity"))
            .env("IDENTITY_HEADER", IDENTITY_HEADER)
            .env_remove("IDENTITY_SERVER_THUMBPRINT")
            .env("RUST_LOG", "debug");
        command
    };
    let mut gateway = KillOnDrop(
        spillway(&["serve"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let collect = |pipe: Box<dyn std::io::Read + Send>,
                   started: Option<tokio::sync::mpsc::UnboundedSender<()>>| {
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut all = String::new();
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains("spillway serving")
                    && let Some(started) = &started
                {
                    let _ = started.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        })
    };
    let stderr = collect(
        Box::new(gateway.0.stderr.take().unwrap()),
        Some(started_tx.clone()),
    );
    let stdout = collect(Box::new(gateway.0.stdout.take().unwrap()), Some(started_tx));
    tokio::time::timeout(Duration::from_secs(60), started.recv())
        .await
        .expect("the gateway starts")
        .expect("the gateway starts");

    // Everything the clients see, headers and bodies.
    let seen = std::cell::RefCell::new(String::new());
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let chat = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let record = async |request: reqwest::RequestBuilder| -> u16 {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = format!("{:?}\n", response.headers());
        let body = response.text().await.unwrap();
        seen.borrow_mut().push_str(&(headers + &body));
        status
    };
    let body =
        serde_json::json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 5 });
    let stream =
        serde_json::json!({ "messages": [{ "role": "user", "content": "hi" }], "stream": true });
    // The wrong key fails over (upstream 401), the identity's token serves.
    assert_eq!(
        record(http.post(&chat).header("api-key", CLIENT_KEY).json(&body)).await,
        200
    );
    assert_eq!(
        record(http.post(&chat).bearer_auth(CLIENT_KEY).json(&stream)).await,
        200
    );
    assert_eq!(
        record(
            http.post(&chat)
                .header("api-key", "not-the-key")
                .json(&body)
        )
        .await,
        401
    );
    assert_eq!(
        record(http.post(&chat).bearer_auth(CLIENT_JWT).json(&body)).await,
        401
    );
    assert_eq!(
        record(
            http.post(&chat)
                .header("api-key", CLIENT_KEY)
                .body("{not json")
        )
        .await,
        400
    );
    let admin = |path: &str| format!("http://127.0.0.1:{admin_port}{path}");
    for path in ["/metrics", "/admin/state", "/admin/config"] {
        assert_eq!(
            record(http.get(admin(path)).bearer_auth(ADMIN_TOKEN)).await,
            200,
            "{path}"
        );
        assert_eq!(
            record(http.get(admin(path)).bearer_auth("wrong")).await,
            401,
            "{path}"
        );
    }
    // The admin answers say what they should: the members, and the Redis URL redacted.
    let admin_json = async |path: &str| -> serde_json::Value {
        let answer = http.get(admin(path)).bearer_auth(ADMIN_TOKEN).send().await;
        answer.unwrap().json().await.unwrap()
    };
    let config = admin_json("/admin/config").await;
    assert_eq!(
        config["state"]["redis_url"],
        format!("redis://:REDACTED@127.0.0.1:{redis_port}")
    );
    assert_eq!(config["backends"].as_array().map(Vec::len), Some(3));
    let state = admin_json("/admin/state").await;
    assert_eq!(state["pools"][0]["name"], "gpt-4o", "{state}");
    assert_eq!(
        state["pools"][0]["members"].as_array().map(Vec::len),
        Some(3)
    );
    for args in [&["state"][..], &["state", "--json"][..]] {
        let state = spillway(args).output().unwrap();
        assert!(
            state.status.success(),
            "{}",
            String::from_utf8_lossy(&state.stderr)
        );
        seen.borrow_mut()
            .push_str(&String::from_utf8_lossy(&state.stdout));
        seen.borrow_mut()
            .push_str(&String::from_utf8_lossy(&state.stderr));
    }
    let json = spillway(&["state", "--json"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(report["store"], "redis", "{report}");

    // Redis goes away: its errors are logged, and requests go on.
    drop(redis);
    for _ in 0..3 {
        assert_eq!(
            record(http.post(&chat).header("api-key", CLIENT_KEY).json(&body)).await,
            200
        );
    }
    let state = spillway(&["state"]).output().unwrap();
    assert!(!state.status.success(), "no Redis to read");
    seen.borrow_mut()
        .push_str(&String::from_utf8_lossy(&state.stdout));
    seen.borrow_mut()
        .push_str(&String::from_utf8_lossy(&state.stderr));

    // SIGTERM flushes the spans.
    sigterm(&gateway.0);
    tokio::time::timeout(Duration::from_secs(20), received.exported.notified())
        .await
        .expect("spans exported");
    tokio::task::spawn_blocking(move || {
        let _ = gateway.0.wait();
    })
    .await
    .unwrap();
    let logs = stderr.join().unwrap() + &stdout.join().unwrap();
    assert!(logs.contains("DEBUG"), "logs were at debug");
    assert!(
        logs.contains("Redis unavailable"),
        "the outage was logged (and searched)"
    );
    assert!(
        sim.stats("wrong-key", "gpt-4o").requests == 0
            && sim.stats("identity", "gpt-4o").requests > 0,
        "the wrong key was refused upstream and the identity's token served"
    );

    let seen = seen.into_inner();
    let spans = received.spans.lock().unwrap().clone();
    assert!(!spans.is_empty());
    for secret in SECRETS {
        assert!(!logs.contains(secret), "{secret} is in the logs");
        assert!(
            !seen.contains(secret),
            "{secret} is in an answer or in `spillway state`"
        );
        let exported = spans
            .iter()
            .any(|body| body.windows(secret.len()).any(|w| w == secret.as_bytes()));
        assert!(!exported, "{secret} is in an exported span");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
