//! `spillway demo --classes`: one PTU pair shared by an interactive product and a batch job.
//! Interactive traffic comes in waves (its load swings between a few and many clients);
//! batch runs flat out with `overflow = "wait"`: it takes the PTU's room below the reserve
//! line in the valleys and waits, never on PAYG, while interactive keeps its share. Each
//! second shows where each class's tokens went; the end prints what they cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::{FLEET, Replica, WINDOW_MS};
use crate::config::Config;
use crate::sim::{DeploymentKind, SimHandle};

const INTERACTIVE_KEY: &str = "demo-interactive-key";
const BATCH_KEY: &str = "demo-batch-key";
/// Interactive clients swing between these over one period.
const INTERACTIVE_CLIENTS: (usize, usize) = (1, 4);
const WAVE_PERIOD: Duration = Duration::from_secs(20);
const BATCH_CLIENTS: usize = 8;

/// Tokens each class got per tier, and the requests it saw refused.
#[derive(Default)]
struct Tally {
    tokens: HashMap<(&'static str, &'static str), u64>,
    refused: HashMap<&'static str, u64>,
}

/// The demo configuration: the usual fleet, PTUs with a 30 % reserve, two consumers, two
/// classes (batch waits), and prices for the cost table.
pub(super) fn gateway_config(sim: &SimHandle, redis: Option<&str>) -> String {
    let mut config = super::gateway_config(sim, redis)
        .replace("tpm = ", "kind = \"ptu\"\nreserve = 0.3\ntpm = ");
    config += &format!(
        "[[classes]]\nname = \"interactive\"\nrank = 100\n\
         [[classes]]\nname = \"batch\"\nrank = 10\noverflow = \"wait\"\nmax_wait_ms = 30000\n\
         [[consumers]]\nname = \"chat-app\"\nkey_sha256 = \"{}\"\n\
         [[consumers]]\nname = \"nightly-evals\"\nclass = \"batch\"\nkey_sha256 = \"{}\"\n\
         [[prices]]\nkind = \"payg\"\npool = \"*\"\ninput_per_1m = 2.5\ncached_input_per_1m = 1.25\noutput_per_1m = 10.0\n",
        crate::auth::consumers::key_sha256_hex(INTERACTIVE_KEY),
        crate::auth::consumers::key_sha256_hex(BATCH_KEY),
    );
    for (name, _, kind, _) in FLEET {
        if kind == DeploymentKind::Ptu {
            config +=
                &format!("[[prices]]\nkind = \"ptu\"\nbackend = \"{name}\"\nper_month = 2000\n");
        }
    }
    config
}

pub(super) async fn run(
    config: &Config,
    replicas: &[Replica],
    gateways: Vec<Arc<crate::Gateway>>,
    duration: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "classes: interactive swings between {} and {} clients every {} s; batch runs {BATCH_CLIENTS} clients flat out and waits for the PTU (reserve 30 %); budgets per {} s window\n",
        INTERACTIVE_CLIENTS.0,
        INTERACTIVE_CLIENTS.1,
        WAVE_PERIOD.as_secs(),
        WINDOW_MS / 1000
    );
    let tally = Arc::new(Mutex::new(Tally::default()));
    let end = Instant::now() + duration;
    let urls: Arc<Vec<String>> = Arc::new(replicas.iter().map(|r| r.url.clone()).collect());
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..INTERACTIVE_CLIENTS.1 + BATCH_CLIENTS {
        let batch = i >= INTERACTIVE_CLIENTS.1;
        let (http, urls, tally) = (http.clone(), urls.clone(), tally.clone());
        clients.push(tokio::spawn(async move {
            let mut n = i;
            while Instant::now() < end {
                // Interactive client i is active while the wave is above it.
                if !batch && i >= interactive_clients(started.elapsed()) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                n += 1;
                let url = &urls[n % urls.len()];
                let key = if batch { BATCH_KEY } else { INTERACTIVE_KEY };
                let request = one_request(&http, url, key);
                let outcome = tokio::time::timeout_at(end + Duration::from_secs(5), request).await;
                let class = if batch { "batch" } else { "interactive" };
                let mut tally = tally.lock().expect("demo tally");
                match outcome {
                    Ok(Ok((200, tier, tokens))) => {
                        *tally.tokens.entry((class, tier)).or_default() += tokens;
                    }
                    _ => *tally.refused.entry(class).or_default() += 1,
                }
            }
        }));
    }

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut before = HashMap::new();
    println!(
        "{:>5} {:>7} {:>14} {:>14} {:>14} {:>9}",
        "t", "clients", "interactive", "", "batch", ""
    );
    println!(
        "{:>5} {:>7} {:>14} {:>14} {:>14} {:>9}",
        "", "", "PTU tok/s", "PAYG tok/s", "PTU tok/s", "PAYG"
    );
    for second in 1..=duration.as_secs().max(1) {
        tick.tick().await;
        let now = tally.lock().expect("demo tally").tokens.clone();
        let rate = |class, tier| {
            now.get(&(class, tier)).copied().unwrap_or(0)
                - before.get(&(class, tier)).copied().unwrap_or(0)
        };
        println!(
            "{second:>4}s {:>7} {:>14} {:>14} {:>14} {:>9}",
            interactive_clients(started.elapsed()),
            rate("interactive", "ptu"),
            rate("interactive", "payg"),
            rate("batch", "ptu"),
            rate("batch", "payg"),
        );
        before = now;
    }
    for client in clients {
        let _ = client.await;
    }

    print_summary(&tally.lock().expect("demo tally"));

    // What it cost: every replica's open ledger page written, then the report.
    crate::proxy::all_settled(Duration::from_secs(5)).await;
    for gateway in &gateways {
        gateway.spend.flush().await;
    }
    let prices = crate::cost::PriceTable::from_config(config);
    let report =
        crate::cost::report::read(&*gateways[0].fleet, &prices, Duration::from_secs(3600)).await?;
    println!("\nWhat it cost (spillway cost --since 1h):");
    print!("{}", crate::cost::report::render(&report));
    println!("(a PTU reservation costs its whole hour, however short the run)");
    Ok(())
}

/// Each class's tokens per tier, and its refusals.
fn print_summary(tally: &Tally) {
    let total = |class| -> u64 {
        tally
            .tokens
            .iter()
            .filter(|((c, _), _)| *c == class)
            .map(|(_, t)| t)
            .sum()
    };
    let on = |class, tier| tally.tokens.get(&(class, tier)).copied().unwrap_or(0);
    println!(
        "\ninteractive: {} tokens, {} on PTU, {} on PAYG, {} refused",
        total("interactive"),
        on("interactive", "ptu"),
        on("interactive", "payg"),
        tally.refused.get("interactive").copied().unwrap_or(0)
    );
    println!(
        "batch:       {} tokens, {} on PTU, {} on PAYG (it waits instead), {} gave up waiting",
        total("batch"),
        on("batch", "ptu"),
        on("batch", "payg"),
        tally.refused.get("batch").copied().unwrap_or(0)
    );
}

/// Interactive clients active `elapsed` into the run: a triangle wave.
fn interactive_clients(elapsed: Duration) -> usize {
    let (low, high) = INTERACTIVE_CLIENTS;
    let phase = (elapsed.as_secs_f64() / WAVE_PERIOD.as_secs_f64()).fract();
    let up = if phase < 0.5 {
        phase * 2.0
    } else {
        (1.0 - phase) * 2.0
    };
    low + ((high - low) as f64 * up).round() as usize
}

/// One chat completion with `key`; its status, its tier (by the backend that served it)
/// and its tokens.
async fn one_request(
    http: &reqwest::Client,
    gateway: &str,
    key: &str,
) -> reqwest::Result<(u16, &'static str, u64)> {
    let body = json!({
        "messages": [{ "role": "user", "content": "Summarise the benefits of provisioned throughput in one paragraph." }],
        "max_tokens": 60,
    });
    let response = http
        .post(format!(
            "{gateway}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        ))
        .header("api-key", key)
        .json(&body)
        .send()
        .await?;
    let status = response.status().as_u16();
    let tier = match response.headers().get("x-spillway-backend") {
        Some(b) if b.as_bytes().starts_with(b"ptu") => "ptu",
        _ => "payg",
    };
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    let tokens = answer["usage"]["total_tokens"].as_u64().unwrap_or(0);
    Ok((status, tier, tokens))
}
