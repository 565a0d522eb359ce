//! Stopping a replica (SIGTERM, as a container stop sends) loses nothing: `/readyz` answers
//! 503 at once so load balancers stop sending, requests are still served for the shutdown
//! delay, then the stream in flight finishes whole, its reservation is settled in the shared
//! state with the tokens really served, and the process exits cleanly. Default settings.

mod common;

use common::{KillOnDrop, free_port, instant_ptu, redis_server, resource, sigterm};

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use spillway_gateway::sim::{self, DeploymentSpec, SimConfig};

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed (scripts/test.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_and_settles_them() {
    // A stream of 130 tokens at 50 ms each outlives the shutdown delay (5 s): it is still
    // running when the listeners stop accepting, and drains.
    let slow = DeploymentSpec {
        ms_per_token: 50,
        output_tokens: 130,
        ..instant_ptu()
    };
    let sim = sim::start(SimConfig {
        resources: vec![resource("ptu", None, slow)],
    })
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("spillway-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_redis, redis_port) = redis_server(&dir, &[]);
    let up = async {
        while redis_cli(redis_port, &["PING"]).trim() != "PONG" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), up)
        .await
        .expect("redis-server starts");
    let port = free_port();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
         [state]\nredis_url = \"redis://127.0.0.1:{redis_port}\"\nkey_prefix = \"drain\"\n\
         [[backends]]\nid = \"ptu\"\nurl = \"{}\"\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n",
        free_port(),
        sim.url("ptu")
    );
    std::fs::write(dir.join("spillway.toml"), config).unwrap();
    let mut gateway = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(["serve", "--config"])
            .arg(dir.join("spillway.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = gateway.0.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        all
    });

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let readyz = || http.get(format!("{base}/readyz")).send();
    let ready = async {
        while !readyz().await.is_ok_and(|r| r.status() == 200) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("ready");
    let chat = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let body = |stream: bool| serde_json::json!({ "messages": [{ "role": "user", "content": "hi" }], "stream": stream });

    // A stream is under way when the signal comes.
    let mut stream = http.post(&chat).json(&body(true)).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut received = stream.chunk().await.unwrap().unwrap().to_vec();
    sigterm(&gateway.0);

    // Unready at once (the first probe after the signal is handled says so) ...
    let unready = async {
        while !readyz().await.is_ok_and(|r| r.status() == 503) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), unready)
        .await
        .expect("/readyz turns 503");
    // ... and still serving while load balancers take note.
    let late = http.post(&chat).json(&body(false)).send().await.unwrap();
    assert_eq!(late.status(), 200);
    late.bytes().await.unwrap();

    // The stream finishes whole.
    while let Some(chunk) = stream.chunk().await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&received).ends_with("data: [DONE]\n\n"));

    let status = tokio::task::spawn_blocking(move || gateway.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let logs = logs.join().unwrap();
    assert!(logs.contains("draining"), "{logs}");
    assert!(logs.contains("spillway stopped"), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "no colour codes in a log file: {logs:?}"
    );
    assert!(
        !logs.contains("still running"),
        "every settlement landed before exit: {logs}"
    );

    // Both answers were settled with what was served: the shared usage is the real tokens,
    // not the reservations' estimates (a stream without an output cap reserves thousands).
    let served = sim.stats("ptu", "gpt-4o");
    assert_eq!(served.requests, 2);
    let usage = redis_cli(redis_port, &["HGETALL", "drain:{gpt-4o}:usage:ptu"]);
    let fields: Vec<&str> = usage.lines().collect();
    let charged: u64 = fields
        .chunks(2)
        .filter(|kv| kv[0].starts_with("tokens:"))
        .map(|kv| kv[1].parse::<u64>().unwrap())
        .sum();
    assert_eq!(charged, served.total_tokens, "{usage}");
    let _ = std::fs::remove_dir_all(&dir);
}
