//! Consumer budgets, fleet-wide. A consumer with `tpm`/`rpm` is a pool of one pseudo-member
//! in the fleet state (`spillway:{consumer:<name>}:usage:budget`), so every replica spends the
//! same budget with the same machinery as the deployments' (windows, leases, the fallback).
//! The request's estimate is reserved before any member is tried, and settled with the
//! member's real usage when the answer ends (released when nothing was served).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use spillway_shared::{Admission, BackendId, Candidate, FleetState, PoolName, QuotaCounter};
use tracing::warn;

use super::settlement::OpenReservation;
use crate::auth::consumers::Consumer;
use crate::error::GatewayError;
use crate::proxy::Gateway;

/// The consumer's budget as the fleet state holds it.
struct Budget {
    pool: PoolName,
    candidate: Candidate,
}

impl Budget {
    fn of(consumer: &Consumer) -> Option<Self> {
        (consumer.tpm.is_some() || consumer.rpm.is_some()).then(|| Self {
            pool: PoolName::new(format!("consumer:{}", consumer.name)),
            candidate: Candidate {
                tokens_per_window: consumer.tpm,
                requests_per_window: consumer.rpm,
                ..Candidate::unlimited(BackendId::new("budget"))
            },
        })
    }
}

/// What one request spends of its consumer's allowances: its budget reservation and its
/// quota counter. Settled once, with the tokens served; dropped unsettled, the reservation
/// is released and the quota untouched.
#[derive(Default)]
pub struct ConsumerSpend {
    pub budget: Option<OpenReservation>,
    pub quota: Option<(Arc<dyn FleetState>, QuotaCounter)>,
    /// Its spending limit's counter (micro-USD), when it has one.
    pub spend_cap: Option<(Arc<dyn FleetState>, QuotaCounter)>,
}

impl ConsumerSpend {
    /// Settle with the tokens served and what they cost (`None`: no price known).
    pub fn settle(self, served_tokens: u64, cost_usd: Option<f64>) {
        let micro_usd = cost_usd.map_or(0, |usd| (usd * 1e6).round() as u64);
        if let Some((fleet, counter)) = self.spend_cap.filter(|_| micro_usd > 0) {
            super::settlement::spawn_tracked(async move {
                if let Err(e) = fleet.spend_quota(&counter, micro_usd).await {
                    warn!(error = %e, counter = counter.name, "spend not counted on a consumer's limit");
                }
            });
        }
        if let Some(budget) = self.budget {
            let receipt = budget.receipt(served_tokens);
            drop(budget.settle(receipt));
        }
        if let Some((fleet, counter)) = self.quota.filter(|_| served_tokens > 0) {
            super::settlement::spawn_tracked(async move {
                if let Err(e) = fleet.spend_quota(&counter, served_tokens).await {
                    warn!(error = %e, quota = counter.name, "tokens not counted on a consumer's quota");
                }
            });
        }
    }
}

/// Reserve the request's estimate and one request on its consumer's budget: `None` for a
/// consumer without one, 429 when it is spent. In shadow mode a spent budget is counted and
/// the request served uncharged, so the budget goes on counting exactly what enforcement
/// would have admitted.
pub async fn reserve(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    tokens: u64,
    shadow: impl FnOnce(),
) -> Result<Option<OpenReservation>, GatewayError> {
    let Some(budget) = consumer.and_then(Budget::of) else {
        return Ok(None);
    };
    match gateway
        .fleet
        .acquire(
            &budget.pool,
            std::slice::from_ref(&budget.candidate),
            tokens,
        )
        .await?
    {
        Admission::Admitted {
            backend,
            reservation,
        } => Ok(Some(OpenReservation::new(
            gateway.fleet.clone(),
            budget.pool,
            backend,
            reservation,
        ))),
        Admission::Exhausted { .. } if consumer.is_some_and(|c| !c.enforce) => {
            shadow();
            Ok(None)
        }
        Admission::Exhausted { retry_after, .. } => Err(GatewayError::ConsumerThrottled {
            retry_after: retry_after.max(Duration::from_millis(1)),
        }),
    }
}

/// Bodies this large are counted only after the consumer's budget is seen not to be spent:
/// counting a 16 MiB prompt takes ~0.3 s of a core, a snapshot one state call.
pub const CHECK_BEFORE_COUNTING_BYTES: usize = 64 * 1024;

/// 429 when the consumer's budget for this window is already spent (checked before a large
/// prompt is counted, so a spent key cannot make the replica count for it).
pub async fn check_spent(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    body_bytes: usize,
) -> Result<(), GatewayError> {
    // In shadow mode the reservation counts what a spent budget would have refused.
    match consumer.filter(|c| c.enforce && body_bytes >= CHECK_BEFORE_COUNTING_BYTES) {
        Some(consumer) if spent(gateway, consumer).await => Err(GatewayError::ConsumerThrottled {
            retry_after: Duration::from_secs(1),
        }),
        _ => Ok(()),
    }
}

/// The consumer's budget for this window is used up (tokens or requests). Unknown (the
/// fleet state unreachable) reads as not spent: the reservation decides then.
pub async fn spent(gateway: &Gateway, consumer: &Consumer) -> bool {
    let Some(budget) = Budget::of(consumer) else {
        return false;
    };
    let Ok(snapshot) = gateway
        .fleet
        .snapshot(&budget.pool, std::slice::from_ref(&budget.candidate))
        .await
    else {
        return false;
    };
    let Some(state) = snapshot.members.first() else {
        return false;
    };
    let over = |limit: Option<u64>, used: u64| limit.is_some_and(|limit| used >= limit);
    over(budget.candidate.tokens_per_window, state.tokens_used)
        || over(budget.candidate.requests_per_window, state.requests_used)
}

/// Where usage that no reservation covers (a Realtime session's responses) is charged for
/// this consumer: its budget's pool and pseudo-member, for a consumer with a budget.
pub fn charge_target(consumer: Option<&Consumer>) -> Option<(PoolName, BackendId)> {
    consumer
        .and_then(Budget::of)
        .map(|b| (b.pool, b.candidate.backend))
}

/// The consumer's remaining tokens and requests in the window, as response headers (in place
/// of the deployment's own), for a consumer with a budget.
pub async fn remaining_headers(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    headers: &mut HeaderMap,
) {
    let Some(budget) = consumer.and_then(Budget::of) else {
        return;
    };
    let Ok(snapshot) = gateway
        .fleet
        .snapshot(&budget.pool, std::slice::from_ref(&budget.candidate))
        .await
    else {
        return;
    };
    let Some(state) = snapshot.members.first() else {
        return;
    };
    let names = &gateway.consumer_headers;
    for (name, limit, used) in [
        (
            &names.remaining_tokens,
            budget.candidate.tokens_per_window,
            state.tokens_used,
        ),
        (
            &names.remaining_requests,
            budget.candidate.requests_per_window,
            state.requests_used,
        ),
    ] {
        match limit {
            Some(limit) => {
                headers.insert(name.clone(), HeaderValue::from(limit.saturating_sub(used)));
            }
            None => {
                headers.remove(name);
            }
        }
    }
}
