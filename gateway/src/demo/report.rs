//! The demo's console output: a table each second and a summary at the end.

use crate::sim::DeploymentKind;

use super::load::OutcomeCounts;

/// Cumulative counts for one backend, as its simulator saw them.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendRow {
    pub requests: u64,
    pub tokens: u64,
    /// 429s the backend served.
    pub throttled: u64,
}

pub struct Report {
    backends: Vec<(String, DeploymentKind)>,
    previous: Vec<BackendRow>,
    previous_outcomes: OutcomeCounts,
    /// Second at which PAYG first took traffic, and the PTU 429s served until then.
    first_spill: Option<(u64, u64)>,
}

impl Report {
    pub fn new(backends: Vec<(String, DeploymentKind)>) -> Self {
        let previous = vec![BackendRow::default(); backends.len()];
        Self {
            backends,
            previous,
            previous_outcomes: OutcomeCounts::default(),
            first_spill: None,
        }
    }

    fn is_ptu(&self, i: usize) -> bool {
        self.backends[i].1 == DeploymentKind::Ptu
    }

    pub fn second(&mut self, second: u64, outcomes: OutcomeCounts, rows: Vec<BackendRow>) {
        let delta: Vec<BackendRow> = rows
            .iter()
            .zip(&self.previous)
            .map(|(now, before)| BackendRow {
                requests: now.requests - before.requests,
                tokens: now.tokens - before.tokens,
                throttled: now.throttled - before.throttled,
            })
            .collect();
        let total: u64 = delta
            .iter()
            .map(|d| d.requests - d.throttled)
            .sum::<u64>()
            .max(1);
        let before = self.previous_outcomes;
        println!(
            "t={second:>3}s  clients={:<3} answered: {:>4} ok  {:>3} throttled (429)  {:>3} errors",
            outcomes.workers,
            outcomes.ok - before.ok,
            outcomes.throttled - before.throttled,
            outcomes.errors - before.errors
        );
        for (i, d) in delta.iter().enumerate() {
            let served = d.requests - d.throttled;
            println!(
                "       {:<18} {:<4} {:>5} req {:>7} tok {:>4} 429s {:>4.0}% of traffic",
                self.backends[i].0,
                if self.is_ptu(i) { "PTU" } else { "PAYG" },
                served,
                d.tokens,
                d.throttled,
                100.0 * served as f64 / total as f64
            );
        }
        let payg_now: u64 = (0..rows.len())
            .filter(|&i| !self.is_ptu(i))
            .map(|i| rows[i].requests)
            .sum();
        if self.first_spill.is_none() && payg_now > 0 {
            let ptu_429s = (0..rows.len())
                .filter(|&i| self.is_ptu(i))
                .map(|i| rows[i].throttled)
                .sum();
            self.first_spill = Some((second, ptu_429s));
        }
        self.previous = rows;
        self.previous_outcomes = outcomes;
    }

    pub fn summary(&self, outcomes: OutcomeCounts, rows: Vec<BackendRow>) {
        let sum = |ptu: bool, f: fn(&BackendRow) -> u64| -> u64 {
            (0..rows.len())
                .filter(|&i| self.is_ptu(i) == ptu)
                .map(|i| f(&rows[i]))
                .sum()
        };
        let (ptu_tokens, payg_tokens) = (sum(true, |r| r.tokens), sum(false, |r| r.tokens));
        let (ptu_served, payg_served) = (
            sum(true, |r| r.requests - r.throttled),
            sum(false, |r| r.requests - r.throttled),
        );
        let ptu_429s = sum(true, |r| r.throttled);
        let all_tokens = (ptu_tokens + payg_tokens).max(1);

        println!("\n== summary ==");
        println!(
            "PTU  served {ptu_served:>6} requests, {ptu_tokens:>8} tokens ({:.0}% of tokens), answered {ptu_429s} 429s to the fleet",
            100.0 * ptu_tokens as f64 / all_tokens as f64
        );
        println!(
            "PAYG served {payg_served:>6} requests, {payg_tokens:>8} tokens ({:.0}% of tokens): the overflow",
            100.0 * payg_tokens as f64 / all_tokens as f64
        );
        match self.first_spill {
            Some((second, ptu_429s)) => println!(
                "PTU filled first: PAYG took its first request at t={second}s, once the PTU budgets were spent (PTU had answered {ptu_429s} 429s by then)"
            ),
            None => println!(
                "PTU filled first: the load never exceeded PTU capacity, so PAYG stayed idle"
            ),
        }
        println!(
            "Clients: {} ok, {} saw 429, {} errors{}",
            outcomes.ok,
            outcomes.throttled,
            outcomes.errors,
            if outcomes.throttled == 0 && outcomes.errors == 0 {
                " -- no client ever saw a 429 while PAYG had room"
            } else {
                ""
            }
        );
    }
}
