//! The fleet as operators read it (per pool and backend: tier, region, backoff and why, usage
//! against budget, latency, utilization, estimation error, prompt cache), from the shared
//! state: collected once into a [`FleetReport`], then shown as `spillway state`'s table,
//! as JSON (`spillway state --json`, `GET /admin/state`), or by `spillway top`.

use std::fmt::Write as _;

use serde::Serialize;
use spillway_shared::{FleetState, MemberSnapshot, StateError};

use crate::routing_table::RoutingTable;

#[derive(Clone, Debug, Serialize)]
pub struct FleetReport {
    /// The store and its health (`redis`, `embedded`, `redis (degraded: ...)`).
    pub store: String,
    pub budget_window_s: u64,
    /// The live replicas sharing the store and their distance to it (none on the embedded
    /// store).
    pub replicas: Vec<ReplicaReport>,
    pub pools: Vec<PoolReport>,
    /// What this hour cost so far (`spillway top`, with `[[prices]]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_this_hour: Option<CostSummary>,
}

/// An hour's cost in one line: the total, per class, and what the PTU saved.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CostSummary {
    pub total_usd: f64,
    pub by_class_usd: Vec<(String, f64)>,
    pub saved_by_ptu_usd: f64,
}

impl CostSummary {
    pub fn of(report: &crate::cost::report::CostReport) -> Self {
        let mut by_class: std::collections::BTreeMap<String, f64> = Default::default();
        for row in &report.rows {
            *by_class.entry(row.class.clone()).or_default() += row.cost_usd.unwrap_or(0.0);
        }
        Self {
            total_usd: report.total_usd,
            by_class_usd: by_class.into_iter().collect(),
            saved_by_ptu_usd: report.saved_by_ptu_usd,
        }
    }

    pub fn line(&self) -> String {
        let classes: Vec<String> = self
            .by_class_usd
            .iter()
            .map(|(class, usd)| format!("{class} ${usd:.2}"))
            .collect();
        format!(
            "cost this hour ${:.2} ({}), saved by PTU ${:.2}",
            self.total_usd,
            classes.join(", "),
            self.saved_by_ptu_usd
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaReport {
    pub replica: String,
    /// Its typical round trip to Redis, as it last reported it.
    pub round_trip_ms: f64,
}

impl FleetReport {
    /// "3 replicas, round trip to Redis 0.4 / 84.1 / 85.0 ms", or `None` with none reported.
    pub fn distances(&self) -> Option<String> {
        if self.replicas.is_empty() {
            return None;
        }
        let trips: Vec<String> = self
            .replicas
            .iter()
            .map(|r| format!("{:.1}", r.round_trip_ms))
            .collect();
        Some(format!(
            "{} replicas, round trip to Redis {} ms",
            self.replicas.len(),
            trips.join(" / ")
        ))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PoolReport {
    pub name: String,
    pub members: Vec<MemberReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemberReport {
    pub backend: String,
    pub deployment: String,
    pub tier: u32,
    pub region: Option<String>,
    /// `ok`, or why it is held back (`throttled`, `server_error`, ...).
    pub state: String,
    pub backoff_remaining_ms: Option<u64>,
    pub tokens_used: u64,
    pub tokens_budget: Option<u64>,
    pub requests_used: u64,
    pub requests_budget: Option<u64>,
    pub ttfb_p50_ms: Option<u64>,
    pub ttfb_p95_ms: Option<u64>,
    pub total_p50_ms: Option<u64>,
    pub total_p95_ms: Option<u64>,
    /// PTU utilization last reported (0.95 = 95 %).
    pub utilization: Option<f64>,
    pub remaining_tokens: Option<u64>,
    /// Completed requests: estimated and real tokens, prompt and cached prompt tokens.
    pub estimated_tokens: u64,
    pub actual_tokens: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
}

impl MemberReport {
    fn new(member: &crate::routing_table::Member, state: &MemberSnapshot) -> Self {
        let b = &member.backend;
        Self {
            backend: b.id.to_string(),
            deployment: member.deployment.clone(),
            tier: b.priority,
            region: b.region.clone(),
            state: state
                .backoff
                .map_or("ok".into(), |backoff| backoff.reason.to_string()),
            backoff_remaining_ms: state.backoff.map(|b| b.duration.as_millis() as u64),
            tokens_used: state.tokens_used,
            tokens_budget: b.tpm,
            requests_used: state.requests_used,
            requests_budget: b.rpm,
            ttfb_p50_ms: state.latency.ttfb_ms.quantile_ms(0.5),
            ttfb_p95_ms: state.latency.ttfb_ms.quantile_ms(0.95),
            total_p50_ms: state.latency.total_ms.quantile_ms(0.5),
            total_p95_ms: state.latency.total_ms.quantile_ms(0.95),
            utilization: state.hints.utilization,
            remaining_tokens: state.hints.remaining_tokens,
            estimated_tokens: state.estimated_tokens,
            actual_tokens: state.actual_tokens,
            prompt_tokens: state.prompt_tokens,
            cached_tokens: state.cached_tokens,
        }
    }

    /// How far estimates were from real usage (+ means over-estimated), as a share.
    pub fn estimation_error(&self) -> Option<f64> {
        (self.actual_tokens > 0).then(|| {
            (self.estimated_tokens as f64 - self.actual_tokens as f64) / self.actual_tokens as f64
        })
    }
}

/// Read every pool's members from the fleet state.
pub async fn collect(
    table: &RoutingTable,
    fleet: &dyn FleetState,
    window_ms: u64,
) -> Result<FleetReport, StateError> {
    let mut pools = Vec::new();
    for pool in table.pools() {
        let snapshot = fleet.snapshot(&pool.name, &pool.candidates()).await?;
        pools.push(PoolReport {
            name: pool.name.to_string(),
            members: pool
                .members
                .iter()
                .zip(&snapshot.members)
                .map(|(member, state)| MemberReport::new(member, state))
                .collect(),
        });
    }
    // Distances are a footnote: a store that cannot tell them still shows its pools.
    let replicas = fleet
        .replicas()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| ReplicaReport {
            replica: r.replica,
            round_trip_ms: r.round_trip.as_secs_f64() * 1000.0,
        })
        .collect();
    Ok(FleetReport {
        store: fleet.describe(),
        budget_window_s: window_ms / 1000,
        replicas,
        pools,
        cost_this_hour: None,
    })
}

/// `spillway state`'s table.
pub async fn render(
    table: &RoutingTable,
    fleet: &dyn FleetState,
    window_ms: u64,
) -> Result<String, StateError> {
    Ok(render_report(&collect(table, fleet, window_ms).await?))
}

pub fn render_report(report: &FleetReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet state: {} (budget window {} s)",
        report.store, report.budget_window_s
    );
    if let Some(distances) = report.distances() {
        let _ = writeln!(out, "{distances}");
    }
    for pool in &report.pools {
        let _ = writeln!(out, "\npool {}", pool.name);
        let _ = writeln!(
            out,
            "  {:<22} {:>4} {:<14} {:<22} {:>17} {:>13} {:>15} {:>15} {:>6} {:>8} {:>6}",
            "backend",
            "tier",
            "region",
            "backoff",
            "tokens/budget",
            "req/budget",
            "ttfb p50/p95",
            "total p50/p95",
            "util",
            "est err",
            "cache"
        );
        for m in &pool.members {
            let _ = writeln!(
                out,
                "  {:<22} {:>4} {:<14} {:<22} {:>17} {:>13} {:>15} {:>15} {:>6} {:>8} {:>6}",
                m.backend,
                m.tier,
                m.region.as_deref().unwrap_or("-"),
                backoff(m),
                used(m.tokens_used, m.tokens_budget),
                used(m.requests_used, m.requests_budget),
                quantiles(m.ttfb_p50_ms, m.ttfb_p95_ms),
                quantiles(m.total_p50_ms, m.total_p95_ms),
                m.utilization
                    .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
                m.estimation_error()
                    .map_or("-".into(), |e| format!("{:+.1}%", e * 100.0)),
                cache_share(m.cached_tokens, m.prompt_tokens),
            );
        }
        let (cached, prompt) = pool.members.iter().fold((0, 0), |(c, p), m| {
            (c + m.cached_tokens, p + m.prompt_tokens)
        });
        let _ = writeln!(
            out,
            "  prompt cache: {} of prompt tokens served from cache ({cached} of {prompt})",
            cache_share(cached, prompt)
        );
    }
    out.push_str(LEGEND);
    out
}

/// What the less obvious columns mean, under every table.
pub const LEGEND: &str = "\nttfb, total: latency quantiles read from histogram buckets, so \"≤512\" means at most 512 ms.\n\
est err: estimated minus real tokens of completed requests, over the real ones; + means budgets\n\
reserved more than was used (headroom held back), - less (the window may briefly run over).\n";

/// The share of prompt tokens the prompt cache served (completed requests).
pub fn cache_share(cached: u64, prompt: u64) -> String {
    if prompt == 0 {
        return "-".into();
    }
    format!("{:.0}%", cached as f64 * 100.0 / prompt as f64)
}

fn backoff(m: &MemberReport) -> String {
    m.backoff_remaining_ms.map_or("-".into(), |ms| {
        format!("{:.1}s {}", ms as f64 / 1000.0, m.state)
    })
}

fn used(n: u64, budget: Option<u64>) -> String {
    match budget {
        Some(budget) => format!("{n}/{budget}"),
        None => format!("{n}/-"),
    }
}

fn quantiles(p50: Option<u64>, p95: Option<u64>) -> String {
    match (p50, p95) {
        // Upper bounds of histogram buckets: "≤" says so.
        (Some(p50), Some(p95)) => format!("≤{p50}/≤{p95} ms"),
        _ => "-".into(),
    }
}
