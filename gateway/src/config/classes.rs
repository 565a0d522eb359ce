//! `[[classes]]`: traffic classes. Every request has one (its consumer's, or lower when the
//! request asks); the highest-ranked classes keep each PTU member's `reserve`, the others
//! use a PTU only below its line and, when it has no room, follow their `overflow` rule.

use super::*;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    pub name: String,
    /// Higher ranks come first. The highest rank keeps the PTU reserve; every lower class
    /// stops at `budget × (1 − reserve)` on a PTU member.
    pub rank: u32,
    /// Where a lower class's request goes when the PTU has no room for it.
    #[serde(default)]
    pub overflow: Overflow,
    /// `overflow = "wait"`: the longest a request waits for its turn (then 429).
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// May use `kind = "priority"` members (Azure priority processing, billed above
    /// standard).
    #[serde(default)]
    pub priority_tier: bool,
    /// `false`: shadow mode. The class's rules refuse nothing; what they would have done is
    /// counted (metrics, access log, span) and the request is served as the top class.
    #[serde(default = "enforced")]
    pub enforce: bool,
}

/// Where a lower class's request goes when the PTU has no room below its line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// To the next tiers (priority, when allowed, then standard PAYG), as any request.
    #[default]
    Payg,
    /// Nowhere: 429 with `retry-after` for when the PTU frees up.
    Refuse,
    /// Into the pool's fleet-wide queue: the oldest waiting request gets the PTU's next
    /// room below the line, whichever replica holds it; after `max_wait_ms`, 429.
    Wait,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Payg => "payg",
            Self::Refuse => "refuse",
            Self::Wait => "wait",
        }
    }
}

fn enforced() -> bool {
    true
}

fn default_max_wait_ms() -> u64 {
    60_000
}

/// With no `[[classes]]`: `interactive` (the default class, keeps the reserve, may use the
/// priority tier) and `batch` (below the line, then PAYG).
pub fn default_classes() -> Vec<ClassConfig> {
    vec![
        ClassConfig {
            name: "interactive".into(),
            rank: 100,
            overflow: Overflow::Payg,
            max_wait_ms: default_max_wait_ms(),
            priority_tier: true,
            enforce: true,
        },
        ClassConfig {
            name: "batch".into(),
            rank: 10,
            overflow: Overflow::Payg,
            max_wait_ms: default_max_wait_ms(),
            priority_tier: false,
            enforce: true,
        },
    ]
}

impl Config {
    pub(super) fn validate_classes(&self, bad: &mut impl FnMut(String, String)) {
        if self.classes.is_empty() {
            bad(
                "classes".into(),
                "lists no class: leave it out for the defaults (interactive, batch)".into(),
            );
        }
        let mut names = BTreeSet::new();
        for (i, c) in self.classes.iter().enumerate() {
            let plain = !c.name.is_empty()
                && c.name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
            if !plain {
                bad(
                    format!("classes[{i}].name"),
                    format!(
                        "{:?} must be non-empty and use only letters, digits, '-', '_', '.'",
                        c.name
                    ),
                );
            }
            if c.overflow == Overflow::Wait
                && !(1..=self.routing.request_timeout_ms).contains(&c.max_wait_ms)
            {
                bad(
                    format!("classes[{i}].max_wait_ms"),
                    format!(
                        "must be at least 1 and at most routing.request_timeout_ms ({})",
                        self.routing.request_timeout_ms
                    ),
                );
            }
            if plain && !names.insert(c.name.as_str()) {
                bad(
                    format!("classes[{i}].name"),
                    format!("{:?} is used by another class", c.name),
                );
            }
        }
        for (i, consumer) in self.consumers.iter().enumerate() {
            if let Some(class) = &consumer.class
                && !names.contains(class.as_str())
            {
                bad(
                    format!("consumers[{i}].class"),
                    format!(
                        "{class:?} is not a class (the classes are {})",
                        names.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
    }
}
