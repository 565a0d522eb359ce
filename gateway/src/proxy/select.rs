//! Candidate order: lowest priority number first; inside a tier, random by weight.
//! Pure: takes the RNG as an argument so tests can seed it.

use std::collections::HashSet;

use rand::Rng;
use spillway_shared::BackendId;

use crate::table::Member;

/// Untried members of a pool, in the order the router should try them.
pub fn candidate_order<R: Rng + ?Sized>(
    members: &[Member],
    tried: &HashSet<BackendId>,
    rng: &mut R,
) -> Vec<BackendId> {
    // Weighted random permutation (Efraimidis–Spirakis): key = u^(1/weight), largest first.
    let mut keyed: Vec<(u32, f64, &Member)> = members
        .iter()
        .filter(|m| !tried.contains(&m.backend.id))
        .map(|m| {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            (
                m.backend.priority,
                u.powf(1.0 / f64::from(m.backend.weight)),
                m,
            )
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    keyed
        .into_iter()
        .map(|(_, _, m)| m.backend.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::credentials::BackendCredential;
    use crate::table::Backend;

    fn member(id: &str, priority: u32, weight: u32) -> Member {
        Member {
            backend: Arc::new(Backend {
                id: BackendId::new(id),
                base_url: "http://127.0.0.1:1".into(),
                region: None,
                priority,
                weight,
                credential: BackendCredential::None,
                tpm: None,
                rpm: None,
            }),
            deployment: "d".into(),
        }
    }

    #[test]
    fn lower_priority_number_always_comes_first() {
        let members = [
            member("payg", 2, 100),
            member("ptu-a", 1, 1),
            member("ptu-b", 1, 1),
        ];
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let order = candidate_order(&members, &HashSet::new(), &mut rng);
            assert_eq!(order.len(), 3);
            assert_eq!(order[2].as_str(), "payg");
        }
    }

    #[test]
    fn tried_members_are_left_out() {
        let members = [member("a", 1, 1), member("b", 2, 1)];
        let tried = HashSet::from([BackendId::new("a")]);
        let order = candidate_order(&members, &tried, &mut StdRng::seed_from_u64(1));
        assert_eq!(order, vec![BackendId::new("b")]);
    }

    #[test]
    fn weight_sets_the_share_inside_a_tier() {
        let members = [member("heavy", 1, 3), member("light", 1, 1)];
        let mut rng = StdRng::seed_from_u64(42);
        let runs = 4_000;
        let heavy_first = (0..runs)
            .filter(|_| candidate_order(&members, &HashSet::new(), &mut rng)[0].as_str() == "heavy")
            .count();
        // Expected share 3/4; a seeded run lands well inside this band.
        let share = heavy_first as f64 / runs as f64;
        assert!((0.70..0.80).contains(&share), "heavy share {share}");
    }
}
