//! Consumer token quotas, fleet-wide: tokens per calendar hour, day, week or month, counted
//! in the fleet state (one counter per consumer and period). Like API Management's
//! `llm-token-quota`, a request is refused (403, until the period ends) once the tokens
//! already served reach the quota; a request admitted just below it is served whole and
//! counted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spillway_shared::QuotaCounter;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::auth::consumers::Consumer;
use crate::error::GatewayError;
use crate::proxy::Gateway;

/// The counter of `consumer`'s current period, when it has a quota.
fn counter(consumer: &Consumer, now: SystemTime) -> Option<(u64, QuotaCounter, OffsetDateTime)> {
    let (quota, period) = consumer.token_quota?;
    let (start, end) = period.span(OffsetDateTime::from(now));
    let counter = QuotaCounter {
        name: format!(
            "{}:{}:{}",
            consumer.name,
            period.as_str(),
            start.unix_timestamp()
        ),
        expires_at_ms: (end.unix_timestamp_nanos() / 1_000_000) as u64,
    };
    Some((quota, counter, end))
}

/// The spending counter of `consumer`'s current period (micro-USD), when it has a limit.
fn spend_counter(
    consumer: &Consumer,
    now: SystemTime,
) -> Option<(u64, QuotaCounter, OffsetDateTime)> {
    let (limit, period) = consumer.max_spend?;
    let (start, end) = period.span(OffsetDateTime::from(now));
    let counter = QuotaCounter {
        name: format!(
            "spend:{}:{}:{}",
            consumer.name,
            period.as_str(),
            start.unix_timestamp()
        ),
        expires_at_ms: (end.unix_timestamp_nanos() / 1_000_000) as u64,
    };
    Some((limit, counter, end))
}

/// 403 when the consumer's spending limit for this period is used up; else the counter
/// (micro-USD) its answers' cost goes to (`None` without a limit). Shadow mode as `check`.
pub async fn check_spend(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    shadow: impl FnOnce(),
) -> Result<Option<QuotaCounter>, GatewayError> {
    let now = SystemTime::now();
    let Some((limit, counter, end)) = consumer.and_then(|c| spend_counter(c, now)) else {
        return Ok(None);
    };
    let spent_micro = gateway.fleet.spend_quota(&counter, 0).await?;
    if spent_micro < limit {
        return Ok(Some(counter));
    }
    if consumer.is_some_and(|c| !c.enforce) {
        shadow();
        return Ok(None);
    }
    let period = consumer.and_then(|c| c.max_spend).map(|(_, p)| p);
    Err(GatewayError::SpendExceeded {
        limit_usd: limit as f64 / 1e6,
        unit: period.map_or("period", |p| p.unit()),
        renews_at: end.format(&Rfc3339).unwrap_or_default(),
        retry_after: until(end, now),
    })
}

/// The time from `now` to `end`.
fn until(end: OffsetDateTime, now: SystemTime) -> Duration {
    let left = end.unix_timestamp_nanos().saturating_sub(
        now.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128),
    );
    Duration::from_nanos(left.max(0) as u64)
}

/// 403 when the consumer's quota for this period is spent; else the counter the request's
/// tokens go to (`None` without a quota). In shadow mode a spent quota is counted (`shadow`
/// is told) and the request served uncounted, as enforcement would have left the counter.
pub async fn check(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    shadow: impl FnOnce(),
) -> Result<Option<QuotaCounter>, GatewayError> {
    let now = SystemTime::now();
    let Some((quota, counter, end)) = consumer.and_then(|c| counter(c, now)) else {
        return Ok(None);
    };
    let used = gateway.fleet.spend_quota(&counter, 0).await?;
    if used < quota {
        return Ok(Some(counter));
    }
    if consumer.is_some_and(|c| !c.enforce) {
        shadow();
        return Ok(None);
    }
    let period = consumer.and_then(|c| c.token_quota).map(|(_, p)| p);
    Err(GatewayError::QuotaExceeded {
        quota,
        unit: period.map_or("period", |p| p.unit()),
        renews_at: end.format(&Rfc3339).unwrap_or_default(),
        retry_after: until(end, now),
    })
}
