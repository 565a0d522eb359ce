//! `spillway cost`: the ledger's hours turned into money with the price table. Standard and
//! priority tokens cost their prices; each PTU hour costs its reservation's hourly price,
//! shared by that hour's users in proportion to their tokens (an hour nobody used is
//! `idle`); and PTU tokens are also valued at PAYG prices, which is what the PTU saved.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use spillway_shared::ledger::{HOUR_MS, HourLedger, SpendCounts, SpendKey};

use super::PriceTable;
use crate::config::BackendKind;

/// What one consumer spent in one pool, class and tier.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostRow {
    /// `""`: requests no consumer sent (an open gateway).
    pub consumer: String,
    pub pool: String,
    pub class: String,
    /// `ptu`, `priority` or `payg`.
    pub tier: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// Its cost (`None`: no price for it in `[[prices]]`).
    pub cost_usd: Option<f64>,
    /// PTU rows: what the same tokens would have cost on standard PAYG.
    pub payg_equivalent_usd: Option<f64>,
}

/// One PTU reservation over the report's hours.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReservationRow {
    pub backend: String,
    pub hours: u64,
    /// Its price for those hours.
    pub cost_usd: f64,
    /// The part its users' tokens carry, and the hours nobody used it.
    pub allocated_usd: f64,
    pub idle_usd: f64,
    pub tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostReport {
    /// The hours covered: from the start of the first to the end of the last (unix ms).
    pub from_unix_ms: u64,
    pub to_unix_ms: u64,
    pub rows: Vec<CostRow>,
    pub reservations: Vec<ReservationRow>,
    /// Everything priced: the rows' costs plus idle reservation hours.
    pub total_usd: f64,
    /// PTU tokens at PAYG prices, less what the reservations cost.
    pub saved_by_ptu_usd: f64,
}

/// The report for the last `since`, in whole hours, the current one included (`1h`: this
/// hour; `24h`: this hour and the 23 before), read from the fleet state's ledger.
pub async fn read(
    fleet: &dyn spillway_shared::FleetState,
    prices: &PriceTable,
    since: std::time::Duration,
) -> Result<CostReport, spillway_shared::StateError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let to_hour = spillway_shared::ledger::hour_of(now);
    let hours = (since.as_millis() as u64).div_ceil(HOUR_MS).max(1);
    let from_hour = to_hour.saturating_sub((hours - 1) * HOUR_MS);
    let hours = fleet.spend_between(from_hour, to_hour).await?;
    Ok(build(prices, &hours, (from_hour, to_hour)))
}

/// The report for the hours `from_hour..=to_hour` (unix ms, on the hour).
pub fn build(
    prices: &PriceTable,
    hours: &[HourLedger],
    (from_hour, to_hour): (u64, u64),
) -> CostReport {
    let mut rows: BTreeMap<Group, Tally> = BTreeMap::new();
    let mut reservations: BTreeMap<String, ReservationRow> = prices
        .reservations()
        .map(|(backend, r)| {
            let hours = (to_hour.saturating_sub(from_hour)) / HOUR_MS + 1;
            let row = ReservationRow {
                backend: backend.to_owned(),
                hours,
                cost_usd: r.per_hour * hours as f64,
                allocated_usd: 0.0,
                idle_usd: 0.0,
                tokens: 0,
            };
            (backend.to_owned(), row)
        })
        .collect();
    for (_, lines) in hours {
        // This hour's PTU tokens per reservation: each user's share of its hourly price.
        let mut ptu_tokens: BTreeMap<&str, u64> = BTreeMap::new();
        for (key, counts) in lines.iter().filter(|(k, _)| k.tier == "ptu") {
            *ptu_tokens.entry(key.backend.as_str()).or_default() += counts.input + counts.output;
        }
        for (key, counts) in lines {
            let row = rows.entry(group(key)).or_insert(Tally {
                priced: true,
                ..Tally::default()
            });
            row.counts.add(*counts);
            let (cost, payg) = priced(prices, key, counts, &ptu_tokens);
            match cost {
                Some(cost) => row.cost += cost,
                None => row.priced = false,
            }
            row.payg += payg.unwrap_or(0.0);
            if key.tier == "ptu"
                && let Some(r) = reservations.get_mut(&key.backend)
            {
                r.tokens += counts.input + counts.output;
                r.allocated_usd += cost.unwrap_or(0.0);
            }
        }
    }
    for r in reservations.values_mut() {
        r.idle_usd = (r.cost_usd - r.allocated_usd).max(0.0);
    }
    let rows: Vec<CostRow> = rows
        .into_iter()
        .map(|((consumer, pool, class, tier), tally)| {
            let Tally {
                counts,
                cost,
                payg,
                priced,
            } = tally;
            let ptu = tier == "ptu";
            CostRow {
                consumer,
                pool,
                class,
                tier,
                requests: counts.requests,
                input_tokens: counts.input,
                cached_tokens: counts.cached,
                output_tokens: counts.output,
                cost_usd: priced.then_some(cost),
                payg_equivalent_usd: ptu.then_some(payg),
            }
        })
        .collect();
    let reservations: Vec<ReservationRow> = reservations.into_values().collect();
    // Folded from +0.0: an empty float sum is -0.0, which would print as "-0.00".
    let sum = |values: &mut dyn Iterator<Item = f64>| values.fold(0.0, |a, b| a + b);
    let rows_total = sum(&mut rows.iter().filter_map(|r| r.cost_usd));
    let idle = sum(&mut reservations.iter().map(|r| r.idle_usd));
    let payg_equivalent = sum(&mut rows.iter().filter_map(|r| r.payg_equivalent_usd));
    let ptu_cost = sum(&mut reservations.iter().map(|r| r.cost_usd));
    CostReport {
        from_unix_ms: from_hour,
        to_unix_ms: to_hour + HOUR_MS,
        rows,
        reservations,
        total_usd: rows_total + idle,
        saved_by_ptu_usd: payg_equivalent - ptu_cost,
    }
}

/// A report row's key: consumer, pool, class, tier.
type Group = (String, String, String, String);

/// What a row adds up to: its counts, cost, value at PAYG prices, and whether every line
/// of it had a price.
#[derive(Default)]
struct Tally {
    counts: SpendCounts,
    cost: f64,
    payg: f64,
    priced: bool,
}

fn group(key: &SpendKey) -> Group {
    (
        key.consumer.clone(),
        key.pool.clone(),
        key.class.clone(),
        key.tier.clone(),
    )
}

/// A line's cost, and (PTU) its value at PAYG prices.
fn priced(
    prices: &PriceTable,
    key: &SpendKey,
    counts: &SpendCounts,
    ptu_tokens: &BTreeMap<&str, u64>,
) -> (Option<f64>, Option<f64>) {
    match key.tier.as_str() {
        "ptu" => {
            let share = prices.reservation(&key.backend).map(|r| {
                let hour_total = ptu_tokens.get(key.backend.as_str()).copied().unwrap_or(0);
                let mine = counts.input + counts.output;
                if hour_total == 0 {
                    0.0
                } else {
                    r.per_hour * mine as f64 / hour_total as f64
                }
            });
            let payg = prices
                .tokens(BackendKind::Payg, &key.pool)
                .map(|p| p.cost(counts));
            (share, payg)
        }
        "priority" => (
            prices
                .tokens(BackendKind::Priority, &key.pool)
                .map(|p| p.cost(counts)),
            None,
        ),
        _ => (
            prices
                .tokens(BackendKind::Payg, &key.pool)
                .map(|p| p.cost(counts)),
            None,
        ),
    }
}

/// The report as a table.
pub fn render(report: &CostReport) -> String {
    let usd = |v: Option<f64>| v.map_or("no price".to_owned(), |v| format!("{v:.2}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<12} {:<12} {:<9} {:>9} {:>12} {:>12} {:>12} {:>12} {:>14}",
        "consumer",
        "pool",
        "class",
        "tier",
        "requests",
        "input",
        "cached",
        "output",
        "cost_usd",
        "at_payg_usd"
    );
    for r in &report.rows {
        let consumer = if r.consumer.is_empty() {
            "-"
        } else {
            &r.consumer
        };
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:<12} {:<9} {:>9} {:>12} {:>12} {:>12} {:>12} {:>14}",
            consumer,
            r.pool,
            r.class,
            r.tier,
            r.requests,
            r.input_tokens,
            r.cached_tokens,
            r.output_tokens,
            usd(r.cost_usd),
            r.payg_equivalent_usd
                .map_or(String::new(), |v| format!("{v:.2}")),
        );
    }
    for r in &report.reservations {
        let _ = writeln!(
            out,
            "PTU {}: {} h, {:.2} USD ({:.2} carried by its users' {} tokens, {:.2} idle)",
            r.backend, r.hours, r.cost_usd, r.allocated_usd, r.tokens, r.idle_usd
        );
    }
    let _ = writeln!(
        out,
        "total {:.2} USD; saved by PTU {:.2} USD (its tokens at PAYG prices, less the reservations)",
        report.total_usd, report.saved_by_ptu_usd
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PriceTable {
        let config = crate::config::Config::from_toml(
            r#"
            [[backends]]
            id = "ptu"
            url = "http://127.0.0.1:1"
            kind = "ptu"
            tpm = 1000
            deployments = { "gpt-4o" = "a" }
            [[prices]]
            kind = "payg"
            pool = "*"
            input_per_1m = 2.5
            cached_input_per_1m = 1.25
            output_per_1m = 10.0
            [[prices]]
            kind = "ptu"
            backend = "ptu"
            per_hour = 3.0
        "#,
        )
        .unwrap();
        config.validate().unwrap();
        PriceTable::from_config(&config)
    }

    fn line(consumer: &str, tier: &str) -> SpendKey {
        SpendKey {
            pool: "gpt-4o".into(),
            class: "interactive".into(),
            backend: if tier == "ptu" { "ptu" } else { "payg" }.into(),
            tier: tier.into(),
            consumer: consumer.into(),
        }
    }

    #[test]
    fn payg_at_its_prices_and_a_ptu_hour_shared_by_tokens() {
        let counts = |input, cached, output| SpendCounts {
            input,
            cached,
            output,
            requests: 1,
        };
        let hour = 1_800_000 * HOUR_MS / 1_000;
        let lines = BTreeMap::from([
            (line("a", "payg"), counts(1_000_000, 400_000, 100_000)),
            (line("a", "ptu"), counts(300, 0, 0)),
            (line("b", "ptu"), counts(600, 0, 300)),
        ]);
        let report = build(&table(), &[(hour, lines)], (hour, hour + HOUR_MS));
        let cost = |consumer: &str, tier: &str| {
            report
                .rows
                .iter()
                .find(|r| r.consumer == consumer && r.tier == tier)
                .unwrap()
                .cost_usd
                .unwrap()
        };
        // 600k uncached × 2.5 + 400k cached × 1.25 + 100k output × 10, per 1M.
        assert!((cost("a", "payg") - (1.5 + 0.5 + 1.0)).abs() < 1e-9);
        // The hour's 3 USD over 1,200 PTU tokens: a has 300, b 900.
        assert!((cost("a", "ptu") - 0.75).abs() < 1e-9);
        assert!((cost("b", "ptu") - 2.25).abs() < 1e-9);
        // Two hours of the reservation, one unused.
        let r = &report.reservations[0];
        assert_eq!((r.hours, r.tokens), (2, 1_200));
        assert!((r.idle_usd - 3.0).abs() < 1e-9);
        assert!((report.total_usd - (3.0 + 3.0 + 3.0)).abs() < 1e-9);
        // PTU tokens at PAYG: 900 input × 2.5 + 300 output × 10, per 1M; less 6 USD.
        let at_payg = (900.0 * 2.5 + 300.0 * 10.0) / 1e6;
        assert!((report.saved_by_ptu_usd - (at_payg - 6.0)).abs() < 1e-9);
    }

    #[test]
    fn an_empty_ledger_costs_nothing_and_says_so_without_a_minus() {
        let report = build(&PriceTable::default(), &[], (0, 0));
        assert!(report.rows.is_empty());
        assert!(render(&report).contains("total 0.00 USD; saved by PTU 0.00 USD"));
    }
}
