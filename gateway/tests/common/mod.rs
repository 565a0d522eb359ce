//! What the tests that run the `spillway` binary share: free loopback ports, a child process
//! killed with its test, readiness, and a container-style stop.

#![allow(dead_code)] // each test binary uses a part

use std::process::{Child, Command};
use std::time::Duration;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process (a gateway, a Redis) killed when the test ends, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` on a free loopback port, working in `dir`, with `extra` arguments (a
/// password); killed with its test. Its port.
pub fn redis_server(dir: &std::path::Path, extra: &[&str]) -> (KillOnDrop, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(extra)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is installed (scripts/test.sh installs it)");
    (KillOnDrop(child), port)
}

/// Wait until `{base}/readyz` answers 200 (a gateway at `RUST_LOG=warn` logs no start line).
pub async fn wait_ready(base: &str) {
    let http = reqwest::Client::new();
    let ready = async {
        loop {
            if let Ok(r) = http.get(format!("{base}/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("the gateway becomes ready");
}

/// SIGTERM, as a container stop sends.
pub fn sigterm(child: &Child) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// A simulated resource named `name` serving `gpt-4o` as `deployment` describes, on a free
/// loopback port, with `api_key` when given.
pub fn resource(
    name: &str,
    api_key: Option<&str>,
    deployment: spillway_gateway::sim::DeploymentSpec,
) -> spillway_gateway::sim::ResourceSpec {
    spillway_gateway::sim::ResourceSpec {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: api_key.map(Into::into),
        region: None,
        deployments: vec![deployment],
    }
}

/// A PTU `gpt-4o` deployment answering at once (no time to first token, no time per token).
pub fn instant_ptu() -> spillway_gateway::sim::DeploymentSpec {
    spillway_gateway::sim::DeploymentSpec {
        ttft_ms: 0,
        ms_per_token: 0,
        ..spillway_gateway::sim::DeploymentSpec::new(
            "gpt-4o",
            spillway_gateway::sim::DeploymentKind::Ptu,
            1_000_000,
        )
    }
}
