//! Consumer allowances per calendar period, fleet-wide: a token quota and a spending limit
//! per hour, day, week or month, counted in the fleet state (one counter per consumer,
//! allowance and period). Like API Management's `llm-token-quota`, a request is refused (403,
//! until the period ends) once what was already served reaches the allowance; a request
//! admitted just below it is served whole and counted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spillway_shared::QuotaCounter;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::auth::consumers::Consumer;
use crate::config::quota_period::QuotaPeriod;
use crate::error::GatewayError;
use crate::proxy::Gateway;

/// A consumer's allowance per calendar period: its token quota, or its spending limit.
#[derive(Clone, Copy)]
enum Allowance {
    Tokens,
    /// Counted in micro-USD.
    Spend,
}

/// What the allowance's counter of the current period says.
struct Period {
    /// The allowance (tokens, or micro-USD).
    limit: u64,
    period: QuotaPeriod,
    counter: QuotaCounter,
    end: OffsetDateTime,
}

impl Allowance {
    /// The counter of `consumer`'s current period, when it has this allowance.
    fn period(self, consumer: &Consumer, now: SystemTime) -> Option<Period> {
        let ((limit, period), prefix) = match self {
            Allowance::Tokens => (consumer.token_quota?, ""),
            Allowance::Spend => (consumer.max_spend?, "spend:"),
        };
        let (start, end) = period.span(OffsetDateTime::from(now));
        let counter = QuotaCounter {
            name: format!(
                "{prefix}{}:{}:{}",
                consumer.name,
                period.as_str(),
                start.unix_timestamp()
            ),
            expires_at_ms: (end.unix_timestamp_nanos() / 1_000_000) as u64,
        };
        Some(Period {
            limit,
            period,
            counter,
            end,
        })
    }

    /// The refusal once it is used up.
    fn refusal(self, p: &Period, now: SystemTime) -> GatewayError {
        let (unit, renews_at) = (p.period.unit(), p.end.format(&Rfc3339).unwrap_or_default());
        let retry_after = until(p.end, now);
        match self {
            Allowance::Tokens => GatewayError::QuotaExceeded {
                quota: p.limit,
                unit,
                renews_at,
                retry_after,
            },
            Allowance::Spend => GatewayError::SpendExceeded {
                limit_usd: p.limit as f64 / 1e6,
                unit,
                renews_at,
                retry_after,
            },
        }
    }
}

/// 403 when the allowance for this period is used up; else the counter the request's use
/// goes to (`None` without the allowance). In shadow mode a used-up allowance is counted
/// (`shadow` is told) and the request served uncounted, as enforcement would have left it.
async fn check_allowance(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    allowance: Allowance,
    shadow: impl FnOnce(),
) -> Result<Option<QuotaCounter>, GatewayError> {
    let now = SystemTime::now();
    let Some(period) = consumer.and_then(|c| allowance.period(c, now)) else {
        return Ok(None);
    };
    let used = gateway.fleet.spend_quota(&period.counter, 0).await?;
    if used < period.limit {
        return Ok(Some(period.counter));
    }
    if consumer.is_some_and(|c| !c.enforce) {
        shadow();
        return Ok(None);
    }
    Err(allowance.refusal(&period, now))
}

/// The consumer's token quota: 403 when spent; else the counter its tokens go to.
pub async fn check(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    shadow: impl FnOnce(),
) -> Result<Option<QuotaCounter>, GatewayError> {
    check_allowance(gateway, consumer, Allowance::Tokens, shadow).await
}

/// The consumer's spending limit: 403 when spent; else the counter (micro-USD) its
/// answers' cost goes to.
pub async fn check_spend(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    shadow: impl FnOnce(),
) -> Result<Option<QuotaCounter>, GatewayError> {
    check_allowance(gateway, consumer, Allowance::Spend, shadow).await
}

/// The time from `now` to `end`.
fn until(end: OffsetDateTime, now: SystemTime) -> Duration {
    let left = end.unix_timestamp_nanos().saturating_sub(
        now.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128),
    );
    Duration::from_nanos(left.max(0) as u64)
}
