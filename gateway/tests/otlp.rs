//! Traces: `spillway serve` exports one span per request over OTLP/HTTP to a collector (played
//! here by a loopback receiver that decodes the protobuf), and no secret is in them.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use spillway_gateway::sim::{self, DeploymentKind, DeploymentSpec, ResourceSpec, SimConfig};
use tokio::sync::Notify;

const CLIENT_KEY: &str = "client-secret-key-zzz";
const BACKEND_KEY: &str = "backend-secret-key-yyy";

#[derive(Default)]
struct Collector {
    raw: Mutex<Vec<Vec<u8>>>,
    received: Notify,
}

async fn export(State(c): State<Arc<Collector>>, body: Bytes) -> &'static str {
    c.raw.lock().unwrap().push(body.to_vec());
    c.received.notify_one();
    ""
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_exported_as_a_span_without_secrets() {
    let collector = Arc::new(Collector::default());
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .with_state(collector.clone());
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_url = format!("http://{}/v1/traces", otlp.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(otlp, app).await.unwrap() });

    let deployment = DeploymentSpec {
        ttft_ms: 0,
        ms_per_token: 0,
        ..DeploymentSpec::new("gpt-4o", DeploymentKind::Ptu, 1_000_000)
    };
    let sim = sim::start(SimConfig {
        resources: vec![ResourceSpec {
            name: "ptu".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            api_key: Some(BACKEND_KEY.into()),
            region: None,
            deployments: vec![deployment],
        }],
    })
    .await
    .unwrap();

    let port = free_port();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\n[telemetry]\notlp_endpoint = \"{otlp_url}\"\n\
         [[consumers]]\nname = \"chat-app\"\nkey_env = \"OTLP_TEST_CLIENT_KEY\"\n\
         [[backends]]\nid = \"ptu\"\nurl = \"{}\"\nauth = {{ type = \"api-key\", env = \"OTLP_TEST_BACKEND_KEY\" }}\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n",
        free_port(),
        sim.url("ptu")
    );
    let dir = std::env::temp_dir().join(format!("spillway-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("spillway.toml"), config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["serve", "--config"])
        .arg(dir.join("spillway.toml"))
        .env("OTLP_TEST_CLIENT_KEY", CLIENT_KEY)
        .env("OTLP_TEST_BACKEND_KEY", BACKEND_KEY)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut gateway = KillOnDrop(child);

    // Collect stderr on a thread; the "spillway serving" line is the start-up event.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stderr = gateway.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            all.push_str(&line);
            all.push('\n');
            let _ = lines_tx.send(line);
        }
        all
    });
    let started = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.recv().await {
            if line.contains("spillway serving") {
                return true;
            }
        }
        false
    });
    assert!(started.await.unwrap_or(false), "gateway did not start");

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let r = http
        .post(format!(
            "{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        ))
        .header("api-key", CLIENT_KEY)
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // SIGTERM: graceful shutdown flushes the batch exporter.
    let pid = gateway.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::timeout(Duration::from_secs(10), collector.received.notified())
        .await
        .expect("spans exported");
    let output = tokio::task::spawn_blocking(move || {
        let _ = gateway.0.wait();
        reader.join().unwrap()
    })
    .await
    .unwrap();

    let raw = collector.raw.lock().unwrap().clone();
    let spans: Vec<_> = raw
        .iter()
        .flat_map(|body| {
            ExportTraceServiceRequest::decode(body.as_slice())
                .expect("valid OTLP protobuf")
                .resource_spans
        })
        .flat_map(|rs| rs.scope_spans)
        .flat_map(|ss| ss.spans)
        .collect();
    let proxy = spans
        .iter()
        .find(|s| s.name == "proxy")
        .expect("a proxy span");
    let attribute = |key: &str| {
        proxy
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref())
            .and_then(|v| v.value.clone())
    };
    assert_eq!(
        attribute("pool"),
        Some(AnyValue::StringValue("gpt-4o".into()))
    );
    assert_eq!(
        attribute("backend"),
        Some(AnyValue::StringValue("ptu".into()))
    );
    assert_eq!(
        attribute("consumer"),
        Some(AnyValue::StringValue("chat-app".into()))
    );
    assert_eq!(attribute("attempts"), Some(AnyValue::IntValue(1)));
    assert_eq!(attribute("status"), Some(AnyValue::IntValue(200)));

    for secret in [CLIENT_KEY, BACKEND_KEY] {
        let leaked = raw
            .iter()
            .any(|body| body.windows(secret.len()).any(|w| w == secret.as_bytes()));
        assert!(!leaked, "a key was exported in a span");
        assert!(!output.contains(secret), "a key was logged");
    }
}
