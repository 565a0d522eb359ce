//! What distance to Redis costs a request: the same three-replica fleet next to Redis, 80 ms
//! from it (a proxy adding 40 ms each way) and at mixed distances (one near, two far), on
//! default settings. Each round offers twice the PTU's budget (the PTU fills, PAYG takes the
//! rest), then as much again with the PTU full (the load jumps: answers no longer wait for
//! the PTU's edge), then five times as much (the steady state), 12 requests in flight; arms
//! interleaved, ROUNDS rounds (default 3), medians reported. Client-side latency of each
//! request, p50 and p99, and the difference to the near arm of the same round.
//!
//! Run: `cargo bench -p spillway-tests --bench distance` (ROUNDS=5 for more).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use spillway_tests::far_fleet::{PTU_REQUESTS, PTU_TPM, fleet_at};
use spillway_tests::{Replica, chat_body, chat_url, client};

const NEAR: Duration = Duration::ZERO;
const FAR: Duration = Duration::from_millis(40);
const IN_FLIGHT: usize = 12;

/// Send `count` requests over `replicas`, `IN_FLIGHT` at a time; each one's latency.
async fn timed_load(replicas: &[Replica], count: usize) -> Vec<Duration> {
    let http = client();
    let urls: Vec<String> = replicas.iter().map(|r| chat_url(&r.url)).collect();
    futures_util::stream::iter(0..count)
        .map(|i| {
            let (http, url) = (http.clone(), urls[i % urls.len()].clone());
            async move {
                let started = Instant::now();
                let r = http.post(url).json(&chat_body(false)).send().await;
                let r = r.expect("gateway answers");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body");
                started.elapsed()
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await
}

fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

#[derive(Clone, Copy, Default)]
struct Phase {
    p50: Duration,
    p99: Duration,
}

#[derive(Clone, Copy, Default)]
struct Round {
    fill: Phase,
    jump: Phase,
    steady: Phase,
    ptu_share: f64,
    alone: u64,
    waited: u64,
}

async fn round(one_way: [Duration; 3]) -> Round {
    let fleet = fleet_at(one_way, Some(PTU_TPM)).await;
    let offered = 2 * PTU_REQUESTS as usize;
    let mut fill = timed_load(&fleet.replicas, offered).await;
    let mut jump = timed_load(&fleet.replicas, offered).await;
    let mut steady = timed_load(&fleet.replicas, 5 * offered).await;
    let phase = |s: &mut Vec<Duration>| Phase {
        p50: quantile(s, 0.5),
        p99: quantile(s, 0.99),
    };
    Round {
        fill: phase(&mut fill),
        jump: phase(&mut jump),
        steady: phase(&mut steady),
        ptu_share: fleet.sim.stats("ptu", "gpt-4o").total_tokens as f64 / PTU_TPM as f64,
        alone: fleet.states.iter().map(|s| s.fallback_calls()).sum(),
        waited: fleet.states.iter().map(|s| s.acquires_waited()).sum(),
    }
}

fn median_of<T: Copy + PartialOrd>(rounds: &[Round], f: impl Fn(&Round) -> T) -> T {
    let mut values: Vec<T> = rounds.iter().map(f).collect();
    values.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benchmarks; there is nothing to list
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let arms = [
        ("near (0 ms)", [NEAR; 3]),
        ("far (40 ms each way)", [FAR; 3]),
        ("mixed (0/40/40 ms)", [NEAR, FAR, FAR]),
    ];
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); arms.len()];
    for _ in 0..rounds {
        for (arm, (_, one_way)) in arms.iter().enumerate() {
            results[arm].push(round(*one_way).await);
        }
    }
    println!(
        "# cargo bench -p spillway-tests --bench distance: 3 replicas, defaults, {} requests (PTU filling), {} more (load jump), then {} (steady), {IN_FLIGHT} in flight; medians of {rounds} interleaved rounds",
        2 * PTU_REQUESTS,
        2 * PTU_REQUESTS,
        10 * PTU_REQUESTS
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>12} {:>12} {:>9} {:>7} {:>7} {:>14} {:>14}",
        "arm",
        "fill p50",
        "fill p99",
        "jump p99",
        "steady p50",
        "steady p99",
        "PTU",
        "alone",
        "waited",
        "+p50 steady",
        "+p99 steady"
    );
    let near = &results[0];
    for ((name, _), rounds) in arms.iter().zip(&results) {
        let added = |q: fn(&Phase) -> Duration| {
            let diffs: Vec<f64> = rounds
                .iter()
                .zip(near)
                .map(|(r, n)| ms(q(&r.steady)) - ms(q(&n.steady)))
                .collect();
            let mut sorted = diffs.clone();
            sorted.sort_by(|a, b| a.partial_cmp(b).expect("numbers"));
            sorted[sorted.len() / 2]
        };
        println!(
            "{:<22} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>10.1}ms {:>10.1}ms {:>8.2}x {:>7} {:>7} {:>12.1}ms {:>12.1}ms",
            name,
            ms(median_of(rounds, |r| r.fill.p50)),
            ms(median_of(rounds, |r| r.fill.p99)),
            ms(median_of(rounds, |r| r.jump.p99)),
            ms(median_of(rounds, |r| r.steady.p50)),
            ms(median_of(rounds, |r| r.steady.p99)),
            median_of(rounds, |r| r.ptu_share),
            median_of(rounds, |r| r.alone),
            median_of(rounds, |r| r.waited),
            added(|p| p.p50),
            added(|p| p.p99),
        );
    }
}
