//! The price table at run time: per-token prices by tier and pool, and each PTU
//! reservation's cost per hour and per token at full use.

use std::collections::HashMap;

use spillway_shared::ledger::SpendCounts;

use crate::config::{BackendKind, Config};

/// USD per 1M tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenPrices {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

impl TokenPrices {
    /// What `counts` cost at these prices (cached prompt tokens at the cached price).
    pub fn cost(&self, counts: &SpendCounts) -> f64 {
        let uncached = counts.input.saturating_sub(counts.cached);
        (uncached as f64 * self.input
            + counts.cached as f64 * self.cached_input
            + counts.output as f64 * self.output)
            / 1_000_000.0
    }
}

/// A PTU reservation's cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reservation {
    pub per_hour: f64,
    /// Its size: tokens per minute (the member's `tpm`), for the price per token at full use.
    pub tpm: Option<u64>,
}

impl Reservation {
    /// USD per token when the reservation is used to the full.
    pub fn per_token_at_full_use(&self) -> Option<f64> {
        self.tpm
            .filter(|tpm| *tpm > 0)
            .map(|tpm| self.per_hour / (tpm as f64 * 60.0))
    }
}

#[derive(Clone, Debug, Default)]
pub struct PriceTable {
    /// (tier, pool or `*`) → prices.
    tokens: HashMap<(BackendKind, String), TokenPrices>,
    /// PTU backend id → its reservation.
    reservations: HashMap<String, Reservation>,
}

impl PriceTable {
    /// From a validated configuration.
    pub fn from_config(config: &Config) -> Self {
        let mut table = Self::default();
        for p in &config.prices {
            match (p.kind, &p.pool, &p.backend) {
                (BackendKind::Ptu, _, Some(backend)) => {
                    let tpm = config
                        .backends
                        .iter()
                        .find(|b| &b.id == backend)
                        .and_then(|b| b.tpm);
                    if let Some(per_hour) = p.hourly() {
                        table
                            .reservations
                            .insert(backend.clone(), Reservation { per_hour, tpm });
                    }
                }
                (kind, Some(pool), _) => {
                    let (Some(input), Some(output)) = (p.input_per_1m, p.output_per_1m) else {
                        continue;
                    };
                    let prices = TokenPrices {
                        input,
                        cached_input: p.cached_input_per_1m.unwrap_or(input),
                        output,
                    };
                    table.tokens.insert((kind, pool.clone()), prices);
                }
                _ => {}
            }
        }
        table
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.reservations.is_empty()
    }

    /// Per-token prices of `tier` (`payg` or `priority`) for `pool`, else for `*`.
    pub fn tokens(&self, tier: BackendKind, pool: &str) -> Option<TokenPrices> {
        self.tokens
            .get(&(tier, pool.to_owned()))
            .or_else(|| self.tokens.get(&(tier, "*".to_owned())))
            .copied()
    }

    pub fn reservation(&self, backend: &str) -> Option<Reservation> {
        self.reservations.get(backend).copied()
    }

    /// The PTU reservations, by backend.
    pub fn reservations(&self) -> impl Iterator<Item = (&str, &Reservation)> {
        self.reservations.iter().map(|(b, r)| (b.as_str(), r))
    }

    /// What one answer cost as it is served: standard and priority tokens at their prices,
    /// PTU tokens at the reservation's price per token at full use. `None`: no price known.
    pub fn answer_cost(
        &self,
        tier: BackendKind,
        pool: &str,
        backend: &str,
        counts: &SpendCounts,
    ) -> Option<f64> {
        match tier {
            BackendKind::Ptu => self
                .reservation(backend)?
                .per_token_at_full_use()
                .map(|per_token| per_token * (counts.input + counts.output) as f64),
            tier => self.tokens(tier, pool).map(|p| p.cost(counts)),
        }
    }
}
