//! Candidate order. Tiers are strict: lower priority numbers first. Inside a tier, the first
//! pick is the better of two weighted-random members (power of two choices, so replicas do
//! not herd), judged by fleet-wide latency and budget pressure; the rest follow by cost. A
//! small share of picks explores at random so a recovered member gets measured again.
//! Pure: the RNG and the fleet view are arguments.

use std::collections::{HashMap, HashSet};

use rand::Rng;
use spillway_shared::{BackendId, MemberSnapshot};

use super::cache_affinity;
use crate::routing_table::Member;

/// What shapes the choice beyond the members themselves.
#[derive(Clone, Debug, Default)]
pub struct Preferences {
    /// This replica's region: wins ties.
    pub own_region: Option<String>,
    /// Share of picks (0..1) made at random by weight, ignoring latency.
    pub explore_share: f64,
    /// Output tokens the request may generate, to weigh time per token.
    pub expected_output_tokens: u64,
    /// Prompt-cache affinity: inside each tier, the member this key belongs to leads.
    pub cache_key: Option<u64>,
}

/// Untried members, in the order the router should try them.
pub fn candidate_order<'a, R: Rng + ?Sized>(
    members: &[&'a Member],
    tried: &HashSet<BackendId>,
    view: &HashMap<BackendId, MemberSnapshot>,
    prefs: &Preferences,
    rng: &mut R,
) -> Vec<&'a Member> {
    let mut untried: Vec<&Member> = members
        .iter()
        .copied()
        .filter(|m| !tried.contains(&m.backend.id))
        .collect();
    untried.sort_by_key(|m| m.backend.priority);
    let mut order = Vec::with_capacity(untried.len());
    for tier in untried.chunk_by(|a, b| a.backend.priority == b.backend.priority) {
        let mut tier = weighted_shuffle(tier, rng);
        // The prompt's cache lives on one member: it leads its tier (the others follow in
        // the usual order, for when it does not admit).
        let cached = prefs
            .cache_key
            .and_then(|key| cache_affinity::rendezvous(key, &tier))
            .map(|at| tier.remove(at));
        order.extend(cached);
        if tier.is_empty() {
            continue;
        }
        if rng.random_bool(prefs.explore_share.clamp(0.0, 1.0)) {
            order.extend(tier);
            continue;
        }
        let costs: HashMap<&BackendId, f64> = tier
            .iter()
            .map(|m| (&m.backend.id, cost(m, view.get(&m.backend.id), prefs)))
            .collect();
        // Power of two choices: of the first two in weighted-random order, the cheaper leads.
        if tier.len() >= 2 && costs[&tier[1].backend.id] < costs[&tier[0].backend.id] {
            tier.swap(0, 1);
        }
        let (first, rest) = tier.split_first_mut().expect("a tier has members");
        rest.sort_by(|a, b| costs[&a.backend.id].total_cmp(&costs[&b.backend.id]));
        order.push(*first);
        order.extend(rest.iter().copied());
    }
    order
}

/// Expected milliseconds to serve the request on `member`, raised as its budget fills; a
/// member never measured costs nothing, so it gets measured. Its own region wins ties.
fn cost(member: &Member, state: Option<&MemberSnapshot>, prefs: &Preferences) -> f64 {
    let Some(state) = state else { return 0.0 };
    let ttfb = state.latency.ttfb_ms.quantile_ms(0.5).unwrap_or(0) as f64;
    let per_token = state
        .latency
        .ms_per_output_token
        .quantile_ms(0.5)
        .unwrap_or(0) as f64;
    let mut cost = ttfb + per_token * prefs.expected_output_tokens as f64;
    if let Some(budget) = member.backend.tpm {
        let used = state.tokens_used as f64 / budget.max(1) as f64;
        cost *= 1.0 + used.min(1.0).powi(2);
    }
    let home = prefs.own_region.is_some() && member.backend.region == prefs.own_region;
    if home { cost } else { cost + 0.5 }
}

/// Weighted random permutation (Efraimidis–Spirakis): key = u^(1/weight), largest first.
fn weighted_shuffle<'a, R: Rng + ?Sized>(members: &[&'a Member], rng: &mut R) -> Vec<&'a Member> {
    let mut keyed: Vec<(f64, &Member)> = members
        .iter()
        .map(|m| {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            (u.powf(1.0 / f64::from(m.backend.weight)), *m)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
    keyed.into_iter().map(|(_, m)| m).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use spillway_shared::{LatencyHistograms, UpstreamHints};

    use super::*;
    use crate::auth::credentials::BackendCredential;
    use crate::routing_table::Backend;

    fn member(id: &str, priority: u32, weight: u32, region: &str) -> Member {
        Member {
            backend: Arc::new(Backend {
                id: BackendId::new(id),
                base_url: url::Url::parse("http://127.0.0.1:1").unwrap(),
                upstream: crate::routing_table::UpstreamBase::of(
                    &url::Url::parse("http://127.0.0.1:1").unwrap(),
                ),
                region: Some(region.into()),
                priority,
                weight,
                credential: BackendCredential::None,
                tpm: None,
                rpm: None,
                kind: crate::config::BackendKind::Payg,
                reserve: 0.0,
            }),
            deployment: "d".into(),
        }
    }

    fn measured(id: &str, ttfb_ms: u64, samples: u64) -> (BackendId, MemberSnapshot) {
        let mut latency = LatencyHistograms::default();
        for _ in 0..samples {
            latency.ttfb_ms.record(ttfb_ms);
        }
        let snapshot = MemberSnapshot {
            backend: BackendId::new(id),
            backoff: None,
            tokens_used: 0,
            requests_used: 0,
            hints: UpstreamHints::default(),
            latency,
            estimated_tokens: 0,
            actual_tokens: 0,
            prompt_tokens: 0,
            cached_tokens: 0,
        };
        (BackendId::new(id), snapshot)
    }

    fn first_picks(
        members: &[Member],
        view: &HashMap<BackendId, MemberSnapshot>,
        prefs: &Preferences,
    ) -> HashMap<String, usize> {
        let refs: Vec<&Member> = members.iter().collect();
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = HashMap::new();
        for _ in 0..2_000 {
            let order = candidate_order(&refs, &HashSet::new(), view, prefs, &mut rng);
            *counts.entry(order[0].backend.id.to_string()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn lower_priority_number_always_comes_first() {
        let members = [
            member("payg", 2, 100, "x"),
            member("ptu-a", 1, 1, "x"),
            member("ptu-b", 1, 1, "x"),
        ];
        let refs: Vec<&Member> = members.iter().collect();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let order = candidate_order(
                &refs,
                &HashSet::new(),
                &HashMap::new(),
                &Preferences::default(),
                &mut rng,
            );
            assert_eq!(order.len(), 3);
            assert_eq!(order[2].backend.id.as_str(), "payg");
        }
    }

    #[test]
    fn tried_members_are_left_out() {
        let members = [member("a", 1, 1, "x"), member("b", 2, 1, "x")];
        let refs: Vec<&Member> = members.iter().collect();
        let tried = HashSet::from([BackendId::new("a")]);
        let order = candidate_order(
            &refs,
            &tried,
            &HashMap::new(),
            &Preferences::default(),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(order.len(), 1);
        assert_eq!(order[0].backend.id.as_str(), "b");
    }

    #[test]
    fn weight_sets_the_share_when_latency_is_equal() {
        let members = [member("heavy", 1, 3, "x"), member("light", 1, 1, "x")];
        let counts = first_picks(&members, &HashMap::new(), &Preferences::default());
        // Both unmeasured: equal cost, so the weighted-random leader keeps its place: 3/4.
        let share = counts["heavy"] as f64 / 2_000.0;
        assert!((0.70..0.80).contains(&share), "heavy share {share}");
    }

    #[test]
    fn the_faster_member_wins_most_first_picks_and_exploration_keeps_some_for_the_slow() {
        let members = [member("fast", 1, 1, "x"), member("slow", 1, 1, "x")];
        let view = HashMap::from([measured("fast", 100, 50), measured("slow", 600, 50)]);
        let prefs = Preferences {
            explore_share: 0.05,
            ..Preferences::default()
        };
        let counts = first_picks(&members, &view, &prefs);
        let slow = counts.get("slow").copied().unwrap_or(0) as f64 / 2_000.0;
        // Two of two choices always include the fast one: the slow one leads only when exploring.
        assert!(slow > 0.0 && slow < 0.06, "slow share {slow}");
    }

    #[test]
    fn the_own_region_wins_ties() {
        let members = [
            member("far", 1, 1, "westus"),
            member("home", 1, 1, "eastus"),
        ];
        let view = HashMap::from([measured("far", 100, 10), measured("home", 100, 10)]);
        let prefs = Preferences {
            own_region: Some("eastus".into()),
            ..Preferences::default()
        };
        let counts = first_picks(&members, &view, &prefs);
        assert_eq!(counts.get("home").copied().unwrap_or(0), 2_000);
    }
}
