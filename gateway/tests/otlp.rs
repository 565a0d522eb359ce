//! Traces as operators get them: `spillway serve` with logs at `RUST_LOG=warn` (the usual
//! production setting) still exports every request's spans, over OTLP/HTTP and OTLP/gRPC,
//! to a collector named by the standard `OTEL_*` variables (played here by loopback
//! receivers that decode the protobuf). One span per client request covers the whole answer,
//! with a child per upstream attempt, GenAI and Spillway attributes, and the client's W3C
//! trace context continued to the backend. No secret is in them.

mod common;

use common::{KillOnDrop, free_port, sigterm, wait_ready};

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use spillway_gateway::sim::{
    self, DeploymentKind, DeploymentSpec, Faults, ResourceSpec, SimConfig,
};
use tokio::sync::Notify;

const CLIENT_KEY: &str = "client-secret-key-zzz";
const BACKEND_KEY: &str = "backend-secret-key-yyy";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// What a collector received.
#[derive(Default)]
struct Collector {
    requests: Mutex<Vec<ExportTraceServiceRequest>>,
    metrics: Mutex<Vec<ExportMetricsServiceRequest>>,
    raw: Mutex<Vec<Vec<u8>>>,
    received: Notify,
}

impl Collector {
    fn spans(&self) -> Vec<Span> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_spans.clone())
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans)
            .collect()
    }

    /// Names of the metrics received, and the pools their data points name.
    fn metric_names(&self) -> Vec<String> {
        self.metrics
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_metrics.clone())
            .flat_map(|rm| rm.scope_metrics)
            .flat_map(|sm| sm.metrics)
            .map(|m| m.name)
            .collect()
    }

    fn resource(&self) -> HashMap<String, String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_spans.clone())
            .filter_map(|rs| rs.resource)
            .flat_map(|r| r.attributes)
            .filter_map(|kv| match kv.value.and_then(|v| v.value) {
                Some(AnyValue::StringValue(s)) => Some((kv.key, s)),
                _ => None,
            })
            .collect()
    }
}

async fn http_export(State(c): State<Arc<Collector>>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body.as_ref()).expect("valid OTLP protobuf");
    c.raw.lock().unwrap().push(body.to_vec());
    c.requests.lock().unwrap().push(request);
    c.received.notify_one();
    ""
}

async fn http_metrics(State(c): State<Arc<Collector>>, body: Bytes) -> &'static str {
    let request = ExportMetricsServiceRequest::decode(body.as_ref()).expect("valid OTLP protobuf");
    c.metrics.lock().unwrap().push(request);
    ""
}

struct GrpcCollector(Arc<Collector>);

#[tonic::async_trait]
impl MetricsService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        self.0.raw.lock().unwrap().push(request.encode_to_vec());
        self.0.requests.lock().unwrap().push(request);
        self.0.received.notify_one();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A collector on loopback for `protocol`; its base URL.
async fn collector(protocol: &str) -> (Arc<Collector>, String) {
    let collector = Arc::new(Collector::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    if protocol == "grpc" {
        let traces = TraceServiceServer::new(GrpcCollector(collector.clone()));
        let metrics = MetricsServiceServer::new(GrpcCollector(collector.clone()));
        let incoming = tokio_stream_from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(traces)
                .add_service(metrics)
                .serve_with_incoming(incoming),
        );
    } else {
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .route("/v1/metrics", axum::routing::post(http_metrics))
            .with_state(collector.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }
    (collector, url)
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.clone())
}

fn text(value: &str) -> Option<AnyValue> {
    Some(AnyValue::StringValue(value.into()))
}

/// Run `spillway serve` with RUST_LOG=warn and `env`, in front of a failing PTU and a healthy
/// PAYG deployment; send a plain and a streamed chat (the latter with a `traceparent`);
/// stop it with SIGTERM. Returns the sim, the collector and the gateway's stderr.
async fn run(protocol: &str, env: &[(&str, &str)]) -> (sim::SimHandle, Arc<Collector>, String) {
    let (collector, collector_url) = collector(protocol).await;
    let deployment = DeploymentSpec {
        ttft_ms: 0,
        ms_per_token: 0,
        ..DeploymentSpec::new("gpt-4o", DeploymentKind::Ptu, 1_000_000)
    };
    let resource = |name: &str| ResourceSpec {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: Some(BACKEND_KEY.into()),
        region: Some(format!("{name}-region")),
        deployments: vec![deployment.clone()],
    };
    let sim = sim::start(SimConfig {
        resources: vec![resource("ptu"), resource("payg")],
    })
    .await
    .unwrap();
    // The PTU answers 500: each request's first attempt fails over to PAYG.
    sim.set_faults(
        "ptu",
        "gpt-4o",
        Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
    );

    let port = free_port();
    let backend = |id: &str, priority: u32| {
        format!(
            "[[backends]]\nid = \"{id}\"\nurl = \"{}\"\npriority = {priority}\nregion = \"{id}-region\"\nauth = {{ type = \"api-key\", env = \"OTLP_TEST_BACKEND_KEY\" }}\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n",
            sim.url(id)
        )
    };
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
         [[consumers]]\nname = \"chat-app\"\nkey_env = \"OTLP_TEST_CLIENT_KEY\"\n{}{}",
        free_port(),
        backend("ptu", 1),
        backend("payg", 2),
    );
    let dir = std::env::temp_dir().join(format!("spillway-otlp-{}-{protocol}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("spillway.toml"), config).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
    command
        .args(["serve", "--config"])
        .arg(dir.join("spillway.toml"))
        .env("OTLP_TEST_CLIENT_KEY", CLIENT_KEY)
        .env("OTLP_TEST_BACKEND_KEY", BACKEND_KEY)
        .env("RUST_LOG", "warn")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector_url)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut gateway = KillOnDrop(command.spawn().unwrap());
    let stderr = gateway.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut all).unwrap();
        all
    });

    // At warn there is no start-up line to wait for: the readiness probe says when.
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base).await;
    let chat = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let plain = http
        .post(&chat)
        .header("api-key", CLIENT_KEY)
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 7 }))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    plain.bytes().await.unwrap();
    let streamed = http
        .post(&chat)
        .header("api-key", CLIENT_KEY)
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .header("tracestate", "vendor=abc")
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "hi" }], "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    assert!(streamed.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    // SIGTERM: graceful shutdown flushes the batch exporter.
    sigterm(&gateway.0);
    tokio::time::timeout(Duration::from_secs(20), collector.received.notified())
        .await
        .expect("spans exported");
    let stderr = tokio::task::spawn_blocking(move || {
        let _ = gateway.0.wait();
        reader.join().unwrap()
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (sim, collector, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_http_at_warn_with_genai_attributes_and_trace_context() {
    let (sim, collector, stderr) = run(
        "http/protobuf",
        &[
            ("OTEL_SERVICE_NAME", "edge-gateway"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=test",
            ),
        ],
    )
    .await;
    let resource = collector.resource();
    assert_eq!(
        resource.get("service.name").map(String::as_str),
        Some("edge-gateway")
    );
    assert_eq!(
        resource
            .get("deployment.environment.name")
            .map(String::as_str),
        Some("test")
    );

    let spans = collector.spans();
    let requests: Vec<&Span> = spans.iter().filter(|s| s.kind == 2).collect();
    assert_eq!(
        requests.len(),
        2,
        "one span per client request: {:?}",
        names(&spans)
    );
    let attempts_of = |request: &Span| -> Vec<Span> {
        spans
            .iter()
            .filter(|s| s.parent_span_id == request.span_id)
            .cloned()
            .collect()
    };
    for request in &requests {
        assert_eq!(request.name, "chat gpt-4o", "operation and pool");
        for (key, value) in [
            ("gen_ai.operation.name", "chat"),
            ("gen_ai.provider.name", "azure.ai.openai"),
            ("gen_ai.system", "az.ai.openai"),
            ("gen_ai.request.model", "gpt-4o"),
            ("gen_ai.response.model", "gpt-4o-2024-08-06"),
            ("spillway.pool", "gpt-4o"),
            ("spillway.consumer", "chat-app"),
            ("spillway.backend", "payg"),
            ("spillway.region", "payg-region"),
        ] {
            assert_eq!(attribute(request, key), text(value), "{key}");
        }
        assert_eq!(
            attribute(request, "spillway.tier"),
            Some(AnyValue::IntValue(2))
        );
        assert_eq!(
            attribute(request, "http.response.status_code"),
            Some(AnyValue::IntValue(200))
        );
        // Usage and time to first token are recorded when the answer ends: present on the
        // request's span only because it stays open until then, streams included.
        assert!(
            matches!(attribute(request, "gen_ai.usage.input_tokens"), Some(AnyValue::IntValue(n)) if n > 0)
        );
        assert!(
            matches!(attribute(request, "gen_ai.usage.output_tokens"), Some(AnyValue::IntValue(n)) if n > 0)
        );
        assert!(attribute(request, "spillway.time_to_first_token_ms").is_some());
        let attempts = attempts_of(request);
        let served = attempts
            .iter()
            .find(|a| attribute(a, "spillway.backend") == text("payg"))
            .unwrap();
        assert_eq!(served.kind, 3, "client");
        assert_eq!(served.name, "chat gpt-4o", "operation and deployment");
        assert_eq!(
            attribute(served, "spillway.tier"),
            Some(AnyValue::IntValue(2))
        );
        assert_eq!(attribute(served, "spillway.region"), text("payg-region"));
        assert_eq!(attribute(served, "server.address"), text("127.0.0.1"));
        assert_eq!(
            attribute(served, "http.response.status_code"),
            Some(AnyValue::IntValue(200))
        );
        assert!(attribute(served, "gen_ai.usage.output_tokens").is_some());
        assert!(request.end_time_unix_nano >= served.end_time_unix_nano);
    }
    // The first request tried the PTU first (a 500), then PAYG: a child span each. The PTU
    // was held back after that, so the second went to PAYG at once.
    let plain = requests
        .iter()
        .find(|r| attribute(r, "spillway.stream") == Some(AnyValue::BoolValue(false)))
        .unwrap();
    assert_eq!(
        attribute(plain, "gen_ai.request.max_tokens"),
        Some(AnyValue::IntValue(7))
    );
    assert_eq!(
        attribute(plain, "spillway.attempts"),
        Some(AnyValue::IntValue(2))
    );
    let attempts = attempts_of(plain);
    assert_eq!(attempts.len(), 2, "a child span per attempt");
    let failed = attempts
        .iter()
        .find(|a| attribute(a, "spillway.attempt") == Some(AnyValue::IntValue(1)))
        .unwrap();
    assert_eq!(attribute(failed, "spillway.backend"), text("ptu"));
    assert_eq!(
        attribute(failed, "spillway.tier"),
        Some(AnyValue::IntValue(1))
    );
    assert_eq!(
        attribute(failed, "spillway.retry_reason"),
        text("server_error")
    );
    assert_eq!(attribute(failed, "error.type"), text("500"));
    assert_eq!(
        attribute(failed, "http.response.status_code"),
        Some(AnyValue::IntValue(500))
    );

    // The streamed request continued the client's trace, and the backend was handed the
    // serving attempt's context.
    let streamed = requests
        .iter()
        .find(|r| attribute(r, "spillway.stream") == Some(AnyValue::BoolValue(true)))
        .unwrap();
    assert_eq!(hex(&streamed.trace_id), TRACE_ID);
    assert_eq!(hex(&streamed.parent_span_id), CLIENT_SPAN);
    let serving = spans
        .iter()
        .find(|s| {
            s.parent_span_id == streamed.span_id && attribute(s, "spillway.backend") == text("payg")
        })
        .unwrap();
    let upstream = sim.received("payg");
    let traceparent = upstream
        .iter()
        .filter_map(|r| r.headers.iter().find(|(n, _)| n == "traceparent"))
        .map(|(_, v)| v.clone())
        .find(|v| v.contains(TRACE_ID))
        .expect("the backend got the trace context");
    assert_eq!(
        traceparent,
        format!("00-{TRACE_ID}-{}-01", hex(&serving.span_id))
    );

    // Nothing at warn was logged for healthy traffic, and no key went anywhere.
    for secret in [CLIENT_KEY, BACKEND_KEY] {
        let leaked = collector
            .raw
            .lock()
            .unwrap()
            .iter()
            .any(|body| body.windows(secret.len()).any(|w| w == secret.as_bytes()));
        assert!(!leaked, "a key was exported in a span");
        assert!(!stderr.contains(secret), "a key was logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_grpc_named_spillway_by_default() {
    let (_sim, collector, _stderr) = run("grpc", &[]).await;
    assert!(
        collector
            .metric_names()
            .iter()
            .any(|m| m == "spillway_requests_total"),
        "metrics over gRPC too"
    );
    assert_eq!(
        collector.resource().get("service.name").map(String::as_str),
        Some("spillway")
    );
    let spans = collector.spans();
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.name == "chat gpt-4o" && s.kind == 2)
            .count(),
        2,
        "{:?}",
        names(&spans)
    );
    assert_eq!(
        spans.iter().filter(|s| s.kind == 3).count(),
        3,
        "PTU's 500, then PAYG twice"
    );
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
