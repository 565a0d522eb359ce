//! The access log: with `telemetry.access_log = true`, `spillway serve` writes one JSON line
//! per request to stdout (and none to the logs), at any `RUST_LOG`: who, where, how many
//! attempts, status, tokens, latency and time to first token; a stream's line once it ends.

mod common;

use common::{free_port, instant_ptu, resource, wait_ready};

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use spillway_gateway::sim::{self, SimConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_json_line_per_request_on_stdout() {
    let sim = sim::start(SimConfig {
        resources: vec![resource("ptu", None, instant_ptu())],
    })
    .await
    .unwrap();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("spillway-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\n[telemetry]\naccess_log = true\n\
         [[consumers]]\nname = \"chat-app\"\nkey_sha256 = \"{}\"\n\
         [[backends]]\nid = \"ptu\"\nurl = \"{}\"\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n",
        free_port(),
        spillway_gateway::auth::consumers::key_sha256_hex("access-key"),
        sim.url("ptu")
    );
    std::fs::write(dir.join("spillway.toml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["serve", "--config"])
        .arg(dir.join("spillway.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut all = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut all).unwrap();
        all
    });

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base).await;
    let chat = |pool: &str| {
        format!("{base}/openai/deployments/{pool}/chat/completions?api-version=2024-10-21")
    };
    let mut next_line = async || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.recv())
            .await
            .expect("an access line")
            .expect("stdout open");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };

    let answer = http
        .post(chat("gpt-4o"))
        .header("api-key", "access-key")
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 5 }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.bytes().await.unwrap();
    let line = next_line().await;
    for (key, value) in [
        ("target", serde_json::json!("spillway::access")),
        ("consumer", serde_json::json!("chat-app")),
        ("pool", serde_json::json!("gpt-4o")),
        ("backend", serde_json::json!("ptu")),
        ("tier", serde_json::json!(1)),
        ("attempts", serde_json::json!(1)),
        ("status", serde_json::json!(200)),
    ] {
        assert_eq!(line[key], value, "{key} in {line}");
    }
    assert!(line["input_tokens"].as_u64() > Some(0), "{line}");
    assert!(line["output_tokens"].as_u64() > Some(0), "{line}");
    assert!(
        line["latency_ms"].as_f64() >= line["time_to_first_token_ms"].as_f64(),
        "{line}"
    );

    let stream = http
        .post(chat("gpt-4o"))
        .header("api-key", "access-key")
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "hi" }], "stream": true }))
        .send()
        .await
        .unwrap();
    stream.text().await.unwrap();
    let line = next_line().await;
    assert_eq!(line["status"], 200, "{line}");
    assert!(
        line["output_tokens"].as_u64() > Some(0),
        "the stream's usage: {line}"
    );

    let refused = http
        .post(chat("gpt-4o"))
        .header("api-key", "wrong")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let line = next_line().await;
    assert_eq!(line["status"], 401, "{line}");
    assert_eq!(line["error"], "401", "{line}");
    assert_eq!(line["attempts"], 0, "{line}");
    assert!(
        line.get("consumer").is_none_or(serde_json::Value::is_null),
        "{line}"
    );

    let unknown = http
        .post(chat("nope"))
        .header("api-key", "access-key")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let line = next_line().await;
    assert_eq!(line["error"], "DeploymentNotFound", "{line}");

    let _ = child.kill();
    let _ = child.wait();
    let logs = logs.join().unwrap();
    assert!(
        !logs.contains("spillway::access"),
        "access lines stay out of the logs: {logs}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
