//! What every token cost. Each answer's tokens go to the fleet's cost ledger (hourly, by
//! consumer, pool, class, member and tier; `spillway_shared::ledger`) through a per-replica
//! book flushed once a second; money is computed from the counts with `[[prices]]`:
//! standard (PAYG) and priority tokens at their prices, a PTU's hourly cost shared by its
//! users in proportion to their tokens that hour, and what PTU tokens would have cost on
//! PAYG (`spillway cost`).

pub mod book;
pub mod prices;
pub mod report;

pub use book::SpendBook;
pub use prices::PriceTable;

use std::sync::Arc;

use spillway_shared::ledger::SpendCounts;

use crate::config::BackendKind;
use crate::ops::metrics::AnswerLabels;

/// Prompts above this many tokens are served at the standard tier even when priority
/// processing is asked for, and billed at its price (Azure's documented downgrade).
pub const PRIORITY_PROMPT_LIMIT: u64 = 128_000;

/// What an answer's end needs to count what it cost.
pub struct Costing {
    pub book: Arc<SpendBook>,
    pub prices: Arc<PriceTable>,
    /// The member's kind.
    pub tier: BackendKind,
}

impl Costing {
    /// Count an answer's tokens in the cost ledger; what they cost as served (`None`: no
    /// price known), added to `spillway_cost_usd_total`. `spilled`: Azure's own spillover
    /// served it, at the standard price.
    pub fn count(&self, labels: &AnswerLabels, spilled: bool, counts: SpendCounts) -> Option<f64> {
        let tier = match self.tier {
            _ if spilled => BackendKind::Payg,
            BackendKind::Priority if counts.input > PRIORITY_PROMPT_LIMIT => BackendKind::Payg,
            tier => tier,
        };
        let cost = (!self.prices.is_empty())
            .then(|| {
                let (pool, backend) = (labels.pool.as_str(), labels.backend.as_str());
                self.prices.answer_cost(tier, pool, backend, &counts)
            })
            .flatten();
        self.book.add(labels, tier.as_str(), counts);
        if let Some(usd) = cost {
            crate::ops::metrics::cost(labels, tier.as_str(), usd);
        }
        cost
    }
}
