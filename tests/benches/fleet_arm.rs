//! The fleet arm: three replicas on one Redis (default settings) in front of a PTU and a PAYG
//! deployment, offered twice the PTU's budget at a steady pace for `SECONDS` (default 150,
//! two and a half budget windows). Every second it records what the simulated deployments
//! served and what clients got; it reports the PTU's utilization per minute-long window
//! (from the second minute on), the over-admission (the most any window served past the
//! budget), the PTU's upstream 429s and the clients' 429s, and writes the series to
//! `target/bench/fleet.csv` for `scripts/charts.sh`.
//!
//! Run: `cargo bench -p spillway-tests --bench fleet_arm` (SECONDS=60 for a shorter run).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use spillway_gateway::sim::DeploymentKind;
use spillway_tests::redis_server::RedisServer;
use spillway_tests::{
    backend, chat_body, chat_url, client, instant_deployment, redis_section, resource,
    start_on_redis, start_sim,
};

/// The PTU's budget, tokens per minute (the simulated PTU enforces the same).
const PTU_TPM: u64 = 60_000;
/// What one simulated request costs: 9 prompt and 8 completion tokens.
const TOKENS_PER_REQUEST: u64 = 17;
const WINDOW: u64 = 60;

#[derive(Default)]
struct Clients {
    ok: AtomicU64,
    throttled: AtomicU64,
    other: AtomicU64,
}

fn main() {
    let seconds: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(seconds));
}

async fn run(seconds: u64) {
    let redis = RedisServer::start();
    let sim = start_sim(vec![
        resource(
            "ptu",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, PTU_TPM)],
        ),
        resource(
            "payg",
            vec![instant_deployment(
                "gpt-4o",
                DeploymentKind::Payg,
                100_000_000,
            )],
        ),
    ])
    .await;
    let config = backend(&sim, "ptu", 1).replace(
        "id = \"ptu\"\n",
        &format!("id = \"ptu\"\ntpm = {PTU_TPM}\n"),
    ) + &backend(&sim, "payg", 2)
        + &redis_section(&redis.url(), "");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(start_on_redis(&config).await.0);
    }
    let urls: Vec<String> = replicas.iter().map(|r| chat_url(&r.url)).collect();

    // Twice the PTU's budget, as evenly paced requests spread over the replicas.
    let per_second = 2 * PTU_TPM / TOKENS_PER_REQUEST / 60;
    let clients = Arc::new(Clients::default());
    let http = client();
    let pacer = {
        let clients = clients.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second as u32);
            let mut sent = Vec::new();
            for i in 0..per_second * seconds {
                tick.tick().await;
                let (http, url, clients) = (
                    http.clone(),
                    urls[i as usize % urls.len()].clone(),
                    clients.clone(),
                );
                sent.push(tokio::spawn(async move {
                    let status = match http.post(url).json(&chat_body(false)).send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let _ = r.bytes().await;
                            status
                        }
                        Err(_) => 0,
                    };
                    let counter = match status {
                        200 => &clients.ok,
                        429 => &clients.throttled,
                        _ => &clients.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }));
            }
            for s in sent {
                let _ = s.await;
            }
        })
    };

    // Every second: cumulative PTU and PAYG tokens served, PTU 429s, client outcomes.
    let mut rows: Vec<[u64; 6]> = vec![[0; 6]];
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.tick().await;
    for t in 1..=seconds {
        second.tick().await;
        let (ptu, payg) = (sim.stats("ptu", "gpt-4o"), sim.stats("payg", "gpt-4o"));
        rows.push([
            t,
            ptu.total_tokens,
            payg.total_tokens,
            ptu.throttled,
            clients.throttled.load(Ordering::Relaxed),
            clients.other.load(Ordering::Relaxed),
        ]);
    }
    pacer.await.expect("load");

    // The workspace's target/bench, whatever directory cargo runs the bench in.
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    let mut csv = String::from(
        "second,ptu_tokens,payg_tokens,ptu_upstream_429,client_429,client_other,ptu_window_utilization\n",
    );
    let mut windows = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let window = (i as u64 >= WINDOW)
            .then(|| (row[1] - rows[i - WINDOW as usize][1]) as f64 / PTU_TPM as f64);
        if let Some(u) = window {
            windows.push(u);
        }
        csv += &format!(
            "{},{},{},{},{},{},{}\n",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            window.map_or(String::new(), |u| format!("{u:.4}"))
        );
    }
    std::fs::write(out.join("fleet.csv"), csv).expect("fleet.csv");
    let last = rows.last().copied().unwrap_or_default();
    let mean = windows.iter().sum::<f64>() / windows.len().max(1) as f64;
    let (low, high) = windows
        .iter()
        .fold((f64::MAX, 0f64), |(l, h), &u| (l.min(u), h.max(u)));
    println!(
        "# fleet arm: 3 replicas on Redis, default settings, {per_second} requests/s (2x a PTU of {PTU_TPM} TPM) for {seconds} s"
    );
    println!(
        "PTU utilization per minute window (from the second minute): mean {:.1} %, lowest {:.1} %, highest {:.1} %",
        mean * 100.0,
        low * 100.0,
        high * 100.0
    );
    println!(
        "over-admission (most a window served past the budget): {:.2} %",
        (high - 1.0).max(0.0) * 100.0
    );
    println!(
        "PTU upstream 429s: {}; client 429s: {}; other client errors: {}; served: PTU {} tokens, PAYG {} tokens",
        last[3], last[4], last[5], last[1], last[2]
    );
    println!("# series: target/bench/fleet.csv");
}
