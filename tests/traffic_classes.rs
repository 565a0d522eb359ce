//! Traffic classes over one PTU, fleet-wide: three replicas on one Redis, default settings.
//! A lower class (`batch`) uses the PTU only below its line (`tpm × (1 − reserve)`), decided
//! in the script that admits, so concurrent replicas never let it past; the top class
//! (`interactive`) keeps the reserve and never reaches PAYG. Azure's priority processing is
//! a tier only allowed classes reach, and shadow mode refuses nothing while counting exactly
//! what enforcement would have refused.
//!
//! Every request is 9 prompt + 8 output tokens, estimated exactly: 17 tokens. The PTU's
//! budget is 1,700 (100 requests); with `reserve = 0.75` its line is 425 (25 requests), so
//! interactive's 70 requests (70 % of the budget) and batch's 25 fit it together.

use std::collections::HashMap;

use futures_util::StreamExt;
use serde_json::Value;
use spillway_gateway::auth::consumers::key_sha256_hex;
use spillway_gateway::sim::{DeploymentKind, SimHandle};
use spillway_shared::FleetState;
use spillway_tests::redis_server::RedisServer;
use spillway_tests::*;

const TOKENS_PER_REQUEST: u64 = 17;
const PTU_TPM: u64 = 100 * TOKENS_PER_REQUEST;
const LINE_REQUESTS: usize = 25;

/// The configuration: the PTU with `reserve`, PAYG, optionally the priority member, two
/// classes (batch's `overflow` and `enforce` given), consumers `app` (interactive) and
/// `jobs` (batch), and `extra` (more consumers).
fn config(sim: &SimHandle, redis: &str, batch: &str, priority_member: bool, extra: &str) -> String {
    let mut toml = format!(
        "[[backends]]\nid = \"a\"\nurl = \"{}\"\npriority = 1\nkind = \"ptu\"\ntpm = {PTU_TPM}\n\
         reserve = 0.75\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n",
        sim.url("a")
    );
    if priority_member {
        toml += &format!(
            "[[backends]]\nid = \"p\"\nurl = \"{}\"\npriority = 2\nkind = \"priority\"\n\
             deployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n",
            sim.url("p")
        );
    }
    toml += &backend(sim, "b", 3);
    toml += "[[classes]]\nname = \"interactive\"\nrank = 100\npriority_tier = true\n";
    toml += &format!("[[classes]]\nname = \"batch\"\nrank = 10\n{batch}\n");
    toml += &format!(
        "[[consumers]]\nname = \"app\"\nkey_sha256 = \"{}\"\n\
         [[consumers]]\nname = \"jobs\"\nclass = \"batch\"\nkey_sha256 = \"{}\"\n{extra}",
        key_sha256_hex("app-key"),
        key_sha256_hex("jobs-key")
    );
    toml + &redis_section(redis, "")
}

/// One request's outcome: its status, the member that served it and the error code.
#[derive(Debug)]
struct Answer {
    status: u16,
    backend: String,
    code: Option<String>,
    message: String,
    retry_after: Option<u64>,
    service_tier: Option<String>,
}

async fn send(base: &str, key: &str) -> Answer {
    let response = client()
        .post(chat_url(base))
        .header("api-key", key)
        .json(&chat_body(false))
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    let backend = header(&response, "x-spillway-backend").to_owned();
    let retry_after = header(&response, "retry-after").parse().ok();
    let body: Value = response.json().await.expect("a JSON answer");
    Answer {
        status,
        backend,
        code: body["error"]["code"].as_str().map(str::to_owned),
        message: body["error"]["message"].as_str().unwrap_or("").to_owned(),
        retry_after,
        service_tier: body["service_tier"].as_str().map(str::to_owned),
    }
}

/// `keys[i]` sent to `replicas[i % n]`, 8 at a time; answers in `keys`' order.
async fn load(replicas: &[&Replica], keys: &[&str]) -> Vec<Answer> {
    futures_util::stream::iter(keys.iter().enumerate())
        .map(|(i, key)| send(&replicas[i % replicas.len()].url, key))
        .buffered(8)
        .collect()
        .await
}

fn served_by(answers: &[Answer]) -> HashMap<&str, usize> {
    let mut by = HashMap::new();
    for a in answers.iter().filter(|a| a.status == 200) {
        *by.entry(a.backend.as_str()).or_default() += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_fills_the_ptu_to_its_line_then_spills_and_interactive_never_reaches_payg() {
    let sim = three_tiers().await;
    let redis = RedisServer::start();
    let config = config(&sim, &redis.url(), "overflow = \"payg\"", false, "");
    let (r1, _) = start_on_redis(&config).await;
    let (r2, _) = start_on_redis(&config).await;
    let (r3, _) = start_on_redis(&config).await;
    let fleet = [&r1, &r2, &r3];

    // Batch first, more than the PTU's whole budget: exactly its line on the PTU, whichever
    // replicas admit it concurrently, the rest on PAYG.
    let batch = load(&fleet, &["jobs-key"; 100]).await;
    assert!(batch.iter().all(|a| a.status == 200), "{batch:?}");
    let by = served_by(&batch);
    assert_eq!(by.get("a"), Some(&LINE_REQUESTS), "{by:?}");
    assert_eq!(by.get("b"), Some(&(100 - LINE_REQUESTS)), "{by:?}");

    // Then interactive at 70 % of the budget, mixed with more batch: interactive is served by
    // the PTU's reserve, every time; batch finds no room below its line.
    let mut keys = Vec::new();
    for i in 0..100 {
        keys.push(if i % 10 < 7 { "app-key" } else { "jobs-key" });
    }
    let mixed = load(&fleet, &keys).await;
    assert!(mixed.iter().all(|a| a.status == 200), "{mixed:?}");
    for (key, answer) in keys.iter().zip(&mixed) {
        let expected = if *key == "app-key" { "a" } else { "b" };
        assert_eq!(answer.backend, expected, "{key}: {answer:?}");
    }
    assert_eq!(
        sim.stats("a", "gpt-4o").requests,
        (LINE_REQUESTS + 70) as u64,
        "the PTU served batch's line and every interactive request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_that_refuses_overflow_gets_429_naming_its_class_and_never_reaches_payg() {
    let sim = three_tiers().await;
    let redis = RedisServer::start();
    let config = config(&sim, &redis.url(), "overflow = \"refuse\"", false, "");
    let (r1, _) = start_on_redis(&config).await;
    let (r2, _) = start_on_redis(&config).await;
    let (r3, _) = start_on_redis(&config).await;

    let batch = load(&[&r1, &r2, &r3], &["jobs-key"; 40]).await;
    let served = batch.iter().filter(|a| a.status == 200).count();
    assert_eq!(served, LINE_REQUESTS, "{batch:?}");
    for refused in batch.iter().filter(|a| a.status != 200) {
        assert_eq!(refused.status, 429, "{refused:?}");
        assert_eq!(refused.code.as_deref(), Some("429"));
        assert!(refused.message.contains("'batch'"), "{refused:?}");
        assert!(refused.retry_after.is_some_and(|s| s >= 1), "{refused:?}");
    }
    assert_eq!(
        sim.stats("b", "gpt-4o").requests,
        0,
        "batch never reached PAYG"
    );
    // Interactive still has the reserve; an interactive key lowering its own request to
    // batch gets batch's rule; a batch key cannot raise its request.
    assert_eq!(send(&r1.url, "app-key").await.backend, "a");
    let lowered = client()
        .post(chat_url(&r2.url))
        .header("api-key", "app-key")
        .header("x-spillway-class", "batch")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(lowered.status(), 429);
    let raised = client()
        .post(chat_url(&r3.url))
        .header("api-key", "jobs-key")
        .header("x-spillway-class", "interactive")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(raised.status(), 400);
    let body: Value = raised.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("only lower"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_classes_allowed_the_priority_tier_reach_it_and_it_is_asked_for_priority() {
    let sim = three_tiers().await;
    let redis = RedisServer::start();
    let config = config(&sim, &redis.url(), "overflow = \"payg\"", true, "");
    let (r1, _) = start_on_redis(&config).await;
    let (r2, _) = start_on_redis(&config).await;

    // Fill the PTU with interactive requests until one spills (to the priority tier).
    let mut spilled = None;
    for i in 0..200 {
        let answer = send(&[&r1, &r2][i % 2].url, "app-key").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        if answer.backend != "a" {
            spilled = Some(answer);
            break;
        }
    }
    let interactive = spilled.expect("the PTU's budget fills");
    // Interactive now spills to the priority tier, asking for priority processing (and
    // the answer says it got it); batch skips that tier for standard PAYG.
    assert_eq!(interactive.backend, "p", "{interactive:?}");
    assert_eq!(interactive.service_tier.as_deref(), Some("priority"));
    let batch = send(&r2.url, "jobs-key").await;
    assert_eq!(batch.backend, "b", "{batch:?}");
    assert_eq!(
        batch.service_tier, None,
        "a standard member is sent the body as is"
    );
    let p = sim.stats("p", "gpt-4o");
    assert_eq!((p.requests, p.priority), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_refuses_nothing_and_counts_exactly_what_enforcement_refuses() {
    let sim = three_tiers().await;
    let redis = RedisServer::start();
    // Two consumers with the same budget, one enforced and one in shadow mode; batch's
    // class rule (refuse above the line) in shadow mode.
    let budgets = format!(
        "[[consumers]]\nname = \"metered-enforced\"\ntpm = 100\nkey_sha256 = \"{}\"\n\
         [[consumers]]\nname = \"metered-shadow\"\ntpm = 100\nenforce = false\nkey_sha256 = \"{}\"\n",
        key_sha256_hex("enforced-key"),
        key_sha256_hex("shadow-key")
    );
    let config = config(
        &sim,
        &redis.url(),
        "overflow = \"refuse\"\nenforce = false",
        false,
        &budgets,
    );
    let (r1, _) = start_on_redis(&config).await;
    let (r2, _) = start_on_redis(&config).await;
    let (r3, _) = start_on_redis(&config).await;
    let fleet = [&r1, &r2, &r3];

    // Batch in shadow mode: all 40 served; 15 would have been refused above the line (the PTU
    // served nothing before them: the line is all theirs).
    let batch = load(&fleet, &["jobs-key"; 40]).await;
    assert!(batch.iter().all(|a| a.status == 200), "{batch:?}");
    assert_eq!(shadow_count("jobs", "reserve"), (40 - LINE_REQUESTS) as u64);

    // 100 tokens a window: 5 requests of 17 fit, 3 more do not.
    let enforced = load(&fleet, &["enforced-key"; 8]).await;
    let refused = enforced.iter().filter(|a| a.status == 429).count();
    assert_eq!(refused, 3, "{enforced:?}");
    let shadowed = load(&fleet, &["shadow-key"; 8]).await;
    assert!(shadowed.iter().all(|a| a.status == 200), "{shadowed:?}");
    assert_eq!(shadow_count("metered-shadow", "budget"), refused as u64);
}

/// `spillway_shadow_refusals_total` for a consumer and rule, read from this process's
/// recorder (consumer names are unique to their test).
fn shadow_count(consumer: &str, rule: &str) -> u64 {
    let text = spillway_gateway::ops::metrics::handle().render();
    text.lines()
        .filter(|l| l.starts_with("spillway_shadow_refusals_total{"))
        .filter(|l| l.contains(&format!("consumer=\"{consumer}\"")))
        .filter(|l| l.contains(&format!("rule=\"{rule}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A PTU answering after 300 ms (so requests stay in flight), its line at 10 requests
/// estimated at 509 tokens (9 prompt + `max_tokens` 500) that use 33 (24 output).
async fn slow_ptu() -> SimHandle {
    let ptu = spillway_gateway::sim::DeploymentSpec {
        ttft_ms: 300,
        ms_per_token: 0,
        jitter: 0.0,
        ..spillway_gateway::sim::DeploymentSpec::new("gpt-4o", DeploymentKind::Ptu, 10_000_000)
    };
    start_sim(vec![
        resource("a", vec![ptu]),
        resource(
            "p",
            vec![instant_deployment(
                "gpt-4o",
                DeploymentKind::Payg,
                10_000_000,
            )],
        ),
        resource(
            "b",
            vec![instant_deployment(
                "gpt-4o",
                DeploymentKind::Payg,
                10_000_000,
            )],
        ),
    ])
    .await
}

const WAIT_ESTIMATE: u64 = 509;

fn waiting_config(sim: &SimHandle, redis: &str, max_wait_ms: u64) -> String {
    // tpm = 20 estimates, reserve 0.5: the line holds 10.
    config(
        sim,
        redis,
        &format!("overflow = \"wait\"\nmax_wait_ms = {max_wait_ms}"),
        false,
        "",
    )
    .replacen(
        &format!("tpm = {PTU_TPM}"),
        &format!("tpm = {}", 20 * WAIT_ESTIMATE),
        1,
    )
    .replacen("reserve = 0.75", "reserve = 0.5", 1)
}

/// A batch request with `max_tokens` 500 to `base`; its status when its answer is whole.
async fn send_waiting(base: String) -> u16 {
    let body = serde_json::json!({
        "messages": [{ "role": "user", "content": "Hello there" }], "max_tokens": 500
    });
    let response = client()
        .post(chat_url(&base))
        .header("api-key", "jobs-key")
        .json(&body)
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    response.bytes().await.expect("the whole answer");
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_served_oldest_first_across_replicas_and_a_dead_replica_blocks_no_one()
{
    let sim = slow_ptu().await;
    let redis = RedisServer::start();
    let config = waiting_config(&sim, &redis.url(), 60_000);
    let (r1, _) = start_on_redis(&config).await;
    let (r2, _) = start_on_redis(&config).await;
    let (r3, _) = start_on_redis(&config).await;

    // A replica that took two tickets at the head of the queue and died: it never asks
    // again, so its tickets stop holding their place after their alive time.
    let dead = redis_fleet(&config).await;
    let pool = spillway_shared::PoolName::new("gpt-4o");
    // A line of 0: refused whatever the window holds (no empty-window exception).
    let full = [spillway_shared::Candidate {
        ceiling: Some(0),
        ..spillway_shared::Candidate::unlimited(spillway_shared::BackendId::new("a"))
    }];
    for id in ["dead-1", "dead-2"] {
        let ticket = spillway_shared::Ticket {
            id: id.into(),
            alive: std::time::Duration::from_secs(2),
        };
        let refused = dead
            .acquire_in_turn(&pool, &full, WAIT_ESTIMATE * 10, &ticket)
            .await
            .unwrap();
        assert!(matches!(
            refused,
            spillway_shared::Admission::Exhausted { .. }
        ));
    }

    // 30 requests, 20 ms apart, round robin over the live replicas; each one's completion
    // time, in arrival order.
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..30 {
        let base = [&r1, &r2, &r3][i % 3].url.clone();
        tasks.push(tokio::spawn(async move {
            let status = send_waiting(base).await;
            (status, started.elapsed())
        }));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut done = Vec::new();
    for task in tasks {
        done.push(task.await.unwrap());
    }
    assert!(done.iter().all(|(status, _)| *status == 200), "{done:?}");
    // Oldest first: the line holds 10, so the first 10 arrivals are whole before any of the
    // last 10 is admitted, whichever replica holds them.
    let first = done[..10].iter().map(|(_, t)| *t).max().unwrap();
    let last = done[20..].iter().map(|(_, t)| *t).min().unwrap();
    assert!(first < last, "arrival order kept: {done:?}");
    // No request was overtaken by more than the line's worth of later ones.
    for (i, (_, t)) in done.iter().enumerate() {
        let overtaken_by = done[i + 1..].iter().filter(|(_, u)| u < t).count();
        assert!(
            overtaken_by <= 10,
            "request {i} overtaken by {overtaken_by}: {done:?}"
        );
    }
    assert_eq!(sim.stats("a", "gpt-4o").requests, 30, "all on the PTU");
    assert_eq!(sim.stats("b", "gpt-4o").requests, 0, "none on PAYG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_past_max_wait_gets_429_and_leaves_the_queue() {
    let sim = slow_ptu().await;
    let redis = RedisServer::start();
    let config = waiting_config(&sim, &redis.url(), 100);
    let (r1, fleet) = start_on_redis(&config).await;

    // 12 at once: 10 fit the line, 2 wait 100 ms for a turn that comes after 300 ms.
    let answers: Vec<u16> =
        futures_util::future::join_all((0..12).map(|_| send_waiting(r1.url.clone()))).await;
    let refused = answers.iter().filter(|s| **s == 429).count();
    assert_eq!(refused, 2, "{answers:?}");
    // Their tickets left with them (in the background): a newcomer on a member of its own,
    // room for 1 token, soon finds nothing queued ahead of it.
    let pool = spillway_shared::PoolName::new("gpt-4o");
    let empty = [spillway_shared::Candidate {
        tokens_per_window: Some(1),
        ..spillway_shared::Candidate::unlimited(spillway_shared::BackendId::new("empty"))
    }];
    let probe = spillway_shared::Ticket {
        id: "probe".into(),
        alive: std::time::Duration::from_secs(1),
    };
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let admission = fleet
            .acquire_in_turn(&pool, &empty, 1, &probe)
            .await
            .unwrap();
        if matches!(admission, spillway_shared::Admission::Admitted { .. }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused tickets never left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `spillway demo --classes` runs to its cost table (a short run, embedded state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classes_demo_runs_to_its_cost_table() {
    spillway_gateway::demo::run(spillway_gateway::demo::DemoOptions {
        duration: std::time::Duration::from_secs(3),
        replicas: 2,
        redis: None,
        classes: true,
    })
    .await
    .expect("the demo runs");
}
