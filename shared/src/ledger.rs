//! The cost ledger: tokens served per hour, by consumer, pool, class, member and tier, kept
//! fleet-wide (Redis: `spend.lua`; embedded: in memory) for as long as the operator keeps
//! them. It holds counts only: money is the price table's business (the gateway's `cost`).

use std::collections::BTreeMap;

/// One ledger line: who used which member, in which class and tier.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpendKey {
    pub pool: String,
    pub class: String,
    pub backend: String,
    /// `ptu`, `payg` or `priority`: the price it is charged at.
    pub tier: String,
    /// `""` for a request no consumer sent (an open gateway).
    pub consumer: String,
}

/// What a line adds up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpendCounts {
    /// Prompt tokens, cached ones included.
    pub input: u64,
    /// Prompt tokens the deployment's prompt cache served.
    pub cached: u64,
    pub output: u64,
    pub requests: u64,
}

impl SpendCounts {
    pub fn add(&mut self, other: SpendCounts) {
        self.input += other.input;
        self.cached += other.cached;
        self.output += other.output;
        self.requests += other.requests;
    }
}

/// An hour's ledger: its start (unix ms, on the hour) and its lines.
pub type HourLedger = (u64, BTreeMap<SpendKey, SpendCounts>);

pub const HOUR_MS: u64 = 3_600_000;

/// The start of the hour holding `unix_ms`.
pub fn hour_of(unix_ms: u64) -> u64 {
    unix_ms - unix_ms % HOUR_MS
}

impl SpendKey {
    /// The line as stored: `<pool>|<class>|<backend>|<tier>|<consumer>` (the consumer last,
    /// so any name reads back whole; the others cannot hold `|`).
    pub fn line(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.pool, self.class, self.backend, self.tier, self.consumer
        )
    }

    pub fn parse(line: &str) -> Option<Self> {
        let mut parts = line.splitn(5, '|');
        Some(Self {
            pool: parts.next()?.to_owned(),
            class: parts.next()?.to_owned(),
            backend: parts.next()?.to_owned(),
            tier: parts.next()?.to_owned(),
            consumer: parts.next()?.to_owned(),
        })
    }
}

/// Read one stored field `<what>|<line>` into `lines`.
pub fn read_field(lines: &mut BTreeMap<SpendKey, SpendCounts>, field: &str, value: u64) {
    let Some((what, line)) = field.split_once('|') else {
        return;
    };
    let Some(key) = SpendKey::parse(line) else {
        return;
    };
    let counts = lines.entry(key).or_default();
    match what {
        "input" => counts.input += value,
        "cached" => counts.cached += value,
        "output" => counts.output += value,
        "requests" => counts.requests += value,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_back_whatever_the_consumer_is_called() {
        let key = SpendKey {
            pool: "gpt-4o".into(),
            class: "batch".into(),
            backend: "ptu-eastus".into(),
            tier: "ptu".into(),
            consumer: "team|a b".into(),
        };
        assert_eq!(SpendKey::parse(&key.line()), Some(key.clone()));
        let mut lines = BTreeMap::new();
        read_field(&mut lines, &format!("output|{}", key.line()), 7);
        read_field(&mut lines, &format!("requests|{}", key.line()), 1);
        assert_eq!(
            lines[&key],
            SpendCounts {
                output: 7,
                requests: 1,
                ..SpendCounts::default()
            }
        );
    }
}
