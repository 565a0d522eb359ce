//! `[[prices]]`: what tokens cost, for the cost ledger's money (`spillway cost`, the
//! `spillway_cost_usd_total` metric, `max_spend_usd`). Per-token prices for standard (PAYG)
//! and priority processing, per pool (the model) or `*`; a PTU reservation's cost per hour or
//! month, per PTU backend.

use super::*;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// `payg` or `priority` (prices per 1M tokens), or `ptu` (a reservation's cost).
    pub kind: BackendKind,
    /// `payg`/`priority`: the pool (model) these prices are for, or `*` for any pool.
    #[serde(default)]
    pub pool: Option<String>,
    /// `ptu`: the PTU backend this reservation is.
    #[serde(default)]
    pub backend: Option<String>,
    /// USD per 1M input tokens, per 1M cached input tokens (the input price when not
    /// given), per 1M output tokens.
    #[serde(default)]
    pub input_per_1m: Option<f64>,
    #[serde(default)]
    pub cached_input_per_1m: Option<f64>,
    #[serde(default)]
    pub output_per_1m: Option<f64>,
    /// `ptu`: the reservation's cost in USD per hour, or per month (730 hours).
    #[serde(default)]
    pub per_hour: Option<f64>,
    #[serde(default)]
    pub per_month: Option<f64>,
}

/// Hours in the month a monthly reservation price is spread over (Azure's 730).
pub const HOURS_PER_MONTH: f64 = 730.0;

impl PriceConfig {
    /// A reservation's cost per hour (`ptu`).
    pub fn hourly(&self) -> Option<f64> {
        self.per_hour
            .or(self.per_month.map(|month| month / HOURS_PER_MONTH))
    }
}

impl Config {
    pub(super) fn validate_prices(&self, bad: &mut impl FnMut(String, String)) {
        let mut seen = BTreeSet::new();
        for (i, p) in self.prices.iter().enumerate() {
            let at = |field: &str| format!("prices[{i}].{field}");
            let money = [
                ("input_per_1m", p.input_per_1m),
                ("cached_input_per_1m", p.cached_input_per_1m),
                ("output_per_1m", p.output_per_1m),
                ("per_hour", p.per_hour),
                ("per_month", p.per_month),
            ];
            for (field, value) in money {
                if value.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                    bad(at(field), "must be a price in USD, 0 or more".into());
                }
            }
            match p.kind {
                BackendKind::Payg | BackendKind::Priority => {
                    let Some(pool) = &p.pool else {
                        bad(
                            at("pool"),
                            "names the pool (model) these prices are for, or \"*\"".into(),
                        );
                        continue;
                    };
                    if p.input_per_1m.is_none() || p.output_per_1m.is_none() {
                        bad(
                            at("kind"),
                            "per-token prices need input_per_1m and output_per_1m".into(),
                        );
                    }
                    if p.backend.is_some() || p.per_hour.is_some() || p.per_month.is_some() {
                        bad(
                            at("kind"),
                            "per-token prices take no backend, per_hour or per_month (those are a PTU's)".into(),
                        );
                    }
                    if !seen.insert((p.kind.as_str(), pool.as_str())) {
                        bad(
                            at("pool"),
                            format!("{pool:?} already has {} prices", p.kind.as_str()),
                        );
                    }
                }
                BackendKind::Ptu => {
                    let backend = p.backend.as_deref().unwrap_or("");
                    let is_ptu = self
                        .backends
                        .iter()
                        .any(|b| b.id == backend && b.kind == BackendKind::Ptu);
                    if !is_ptu {
                        bad(
                            at("backend"),
                            format!("{backend:?} must name a kind = \"ptu\" backend"),
                        );
                    }
                    if p.per_hour.is_some() == p.per_month.is_some() {
                        bad(
                            at("kind"),
                            "a PTU reservation takes exactly one of per_hour and per_month".into(),
                        );
                    }
                    if p.pool.is_some() || p.input_per_1m.is_some() || p.output_per_1m.is_some() {
                        bad(
                            at("kind"),
                            "a PTU reservation takes no pool or per-token prices".into(),
                        );
                    }
                    if !seen.insert(("ptu", backend)) {
                        bad(at("backend"), format!("{backend:?} already has a price"));
                    }
                }
            }
        }
    }
}
