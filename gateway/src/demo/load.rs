//! The demo's load generator: client workers that join one by one (a ramp), bounded in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

pub struct LoadPlan {
    pub duration: Duration,
    pub max_workers: usize,
    pub gateways: Vec<String>,
}

/// What the clients saw.
#[derive(Default)]
pub struct Outcomes {
    ok: AtomicU64,
    throttled: AtomicU64,
    errors: AtomicU64,
    workers: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct OutcomeCounts {
    pub ok: u64,
    pub throttled: u64,
    pub errors: u64,
    pub workers: u64,
}

impl Outcomes {
    pub fn snapshot(&self) -> OutcomeCounts {
        OutcomeCounts {
            ok: self.ok.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            workers: self.workers.load(Ordering::Relaxed),
        }
    }
}

/// Start a worker every `duration / max_workers`; each sends requests back to back until
/// the end, spreading them over the replicas.
pub async fn run(plan: LoadPlan, outcomes: Arc<Outcomes>) {
    let http = reqwest::Client::new();
    let end = Instant::now() + plan.duration;
    let step = plan.duration / plan.max_workers as u32;
    let gateways = Arc::new(plan.gateways);
    let mut workers = Vec::new();
    for i in 0..plan.max_workers {
        let start = Instant::now() + step * i as u32;
        if start >= end {
            break;
        }
        let (http, outcomes, gateways) = (http.clone(), outcomes.clone(), gateways.clone());
        workers.push(tokio::spawn(async move {
            tokio::time::sleep_until(start).await;
            outcomes.workers.fetch_add(1, Ordering::Relaxed);
            let mut n = i;
            while Instant::now() < end {
                let gateway = &gateways[n % gateways.len()];
                n += 1;
                let request = one_request(&http, gateway, n % 4 == 0);
                let counter =
                    match tokio::time::timeout_at(end + Duration::from_secs(5), request).await {
                        Ok(Ok(200)) => &outcomes.ok,
                        Ok(Ok(429)) => &outcomes.throttled,
                        _ => &outcomes.errors,
                    };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
}

/// One chat completion (every fourth one streamed), read to the end; returns the status.
async fn one_request(http: &reqwest::Client, gateway: &str, stream: bool) -> reqwest::Result<u16> {
    let body = json!({
        "messages": [{ "role": "user", "content": "Summarise the benefits of provisioned throughput in one paragraph." }],
        "max_tokens": 60,
        "stream": stream,
    });
    let response = http
        .post(format!(
            "{gateway}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        ))
        .json(&body)
        .send()
        .await?;
    let status = response.status().as_u16();
    response.bytes().await?;
    Ok(status)
}
