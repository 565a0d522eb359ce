//! Shadow mode: a rule set with `enforce = false` refuses nothing; what it would have
//! refused is counted (`spillway_shadow_refusals_total`), written on the request's access
//! log line and span (`spillway.shadow`), and the request is served. Operators roll out
//! limits this way.

use std::sync::atomic::{AtomicU8, Ordering};

/// A rule that can run in shadow mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The consumer's `tpm`/`rpm` budget.
    Budget,
    /// The consumer's `token_quota`.
    Quota,
    /// The consumer's `max_spend_usd`.
    Spend,
    /// A lower class's line on a PTU (with `overflow = "refuse"`, or a PTU admission only
    /// the reserve made possible).
    Reserve,
}

impl Rule {
    const ALL: [Rule; 4] = [Rule::Budget, Rule::Quota, Rule::Spend, Rule::Reserve];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Budget => "budget",
            Self::Quota => "quota",
            Self::Spend => "spend",
            Self::Reserve => "reserve",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The rules one request crossed in shadow mode (each counted once).
#[derive(Debug, Default)]
pub struct Marks(AtomicU8);

impl Marks {
    /// Record that `rule` would have refused this request: counted once per request.
    pub fn would_refuse(&self, rule: Rule, pool: &str, consumer: Option<&str>, class: &str) {
        let before = self.0.fetch_or(rule.bit(), Ordering::Relaxed);
        if before & rule.bit() != 0 {
            return;
        }
        crate::ops::metrics::shadow_refusal(pool, consumer.unwrap_or(""), class, rule.as_str());
        tracing::Span::current().record("spillway.shadow", self.names().as_deref());
    }

    /// The rules crossed, comma-separated (`None`: none).
    pub fn names(&self) -> Option<String> {
        let bits = self.0.load(Ordering::Relaxed);
        let names: Vec<&str> = Rule::ALL
            .iter()
            .filter(|r| bits & r.bit() != 0)
            .map(|r| r.as_str())
            .collect();
        (!names.is_empty()).then(|| names.join(","))
    }
}
