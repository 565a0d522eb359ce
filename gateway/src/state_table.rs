//! `spillway state`: the fleet table operators read (per pool and backend: tier, region,
//! backoff and why, usage against budget, latency), from the shared state.

use std::fmt::Write as _;

use spillway_shared::{FleetState, Histogram, MemberSnapshot, StateError};

use crate::table::RoutingTable;

pub async fn render(
    table: &RoutingTable,
    fleet: &dyn FleetState,
    window_ms: u64,
) -> Result<String, StateError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet state: {} (budget window {} s)",
        fleet.describe(),
        window_ms / 1000
    );
    for pool in table.pools() {
        let snapshot = fleet.snapshot(&pool.name, &pool.candidates()).await?;
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
        for (member, state) in pool.members.iter().zip(&snapshot.members) {
            let b = &member.backend;
            let _ = writeln!(
                out,
                "  {:<22} {:>4} {:<14} {:<22} {:>17} {:>13} {:>15} {:>15} {:>6} {:>8} {:>6}",
                b.id.as_str(),
                b.priority,
                b.region.as_deref().unwrap_or("-"),
                backoff(state),
                used(state.tokens_used, b.tpm),
                used(state.requests_used, b.rpm),
                quantiles(&state.latency.ttfb_ms),
                quantiles(&state.latency.total_ms),
                state
                    .hints
                    .utilization
                    .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
                estimation_error(state),
                cache_share(state.cached_tokens, state.prompt_tokens),
            );
        }
        let (cached, prompt) = snapshot.members.iter().fold((0, 0), |(c, p), m| {
            (c + m.cached_tokens, p + m.prompt_tokens)
        });
        let _ = writeln!(
            out,
            "  prompt cache: {} of prompt tokens served from cache ({cached} of {prompt})",
            cache_share(cached, prompt)
        );
    }
    Ok(out)
}

/// The share of prompt tokens the prompt cache served (completed requests).
fn cache_share(cached: u64, prompt: u64) -> String {
    if prompt == 0 {
        return "-".into();
    }
    format!("{:.0}%", cached as f64 * 100.0 / prompt as f64)
}

fn backoff(m: &MemberSnapshot) -> String {
    m.backoff.map_or("-".into(), |b| {
        format!("{:.1}s {}", b.duration.as_secs_f64(), b.reason)
    })
}

/// How far estimates were from real usage, over completed requests (+ means over-estimated).
fn estimation_error(m: &MemberSnapshot) -> String {
    if m.actual_tokens == 0 {
        return "-".into();
    }
    let error = (m.estimated_tokens as f64 - m.actual_tokens as f64) / m.actual_tokens as f64;
    format!("{:+.1}%", error * 100.0)
}

fn used(n: u64, budget: Option<u64>) -> String {
    match budget {
        Some(budget) => format!("{n}/{budget}"),
        None => format!("{n}/-"),
    }
}

fn quantiles(h: &Histogram) -> String {
    match (h.quantile_ms(0.5), h.quantile_ms(0.95)) {
        (Some(p50), Some(p95)) => format!("≤{p50}/≤{p95} ms"),
        _ => "-".into(),
    }
}
