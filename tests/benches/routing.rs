//! What one routing decision costs: the candidate order for a request (strict tiers; inside a
//! tier the better of two weighted-random members by fleet-wide latency, the rest by cost),
//! over pools of 2 members (a PTU and a PAYG), 6 (two tiers of three) and 12 (two of six),
//! every member measured (a latency histogram of 200 samples each).
//! Run: `cargo bench -p spillway-tests --bench routing`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::StdRng;
use spillway_gateway::auth::credentials::BackendCredential;
use spillway_gateway::config::BackendKind;
use spillway_gateway::proxy::bench_access::{Preferences, candidate_order};
use spillway_gateway::routing_table::{Backend, Member, UpstreamBase};
use spillway_shared::{BackendId, LatencyHistograms, MemberSnapshot, UpstreamHints};

fn member(i: usize, priority: u32) -> Member {
    let url = url::Url::parse(&format!("http://127.0.0.1:{}", 1000 + i)).unwrap();
    Member {
        backend: Arc::new(Backend {
            id: BackendId::new(format!("m{i}")),
            upstream: UpstreamBase::of(&url),
            base_url: url,
            region: Some(
                if i.is_multiple_of(2) {
                    "eastus"
                } else {
                    "westus"
                }
                .into(),
            ),
            priority,
            weight: 1 + i as u32 % 3,
            credential: BackendCredential::None,
            tpm: None,
            rpm: None,
            kind: if priority == 1 {
                BackendKind::Ptu
            } else {
                BackendKind::Payg
            },
            reserve: 0.0,
        }),
        deployment: "gpt-4o".into(),
    }
}

fn measured(member: &Member, ttfb_ms: u64) -> (BackendId, MemberSnapshot) {
    let mut latency = LatencyHistograms::default();
    for n in 0..200 {
        latency.ttfb_ms.record(ttfb_ms + n % 7);
    }
    let id = member.backend.id.clone();
    let snapshot = MemberSnapshot {
        backend: id.clone(),
        backoff: None,
        tokens_used: 1_000,
        requests_used: 10,
        hints: UpstreamHints::default(),
        latency,
        estimated_tokens: 0,
        actual_tokens: 0,
        prompt_tokens: 0,
        cached_tokens: 0,
    };
    (id, snapshot)
}

fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("routing");
    for size in [2usize, 6, 12] {
        let members: Vec<Member> = (0..size)
            .map(|i| member(i, if i < size / 2 { 1 } else { 2 }))
            .collect();
        let view: HashMap<BackendId, MemberSnapshot> = members
            .iter()
            .enumerate()
            .map(|(i, m)| measured(m, 100 + 40 * i as u64))
            .collect();
        let refs: Vec<&Member> = members.iter().collect();
        let prefs = Preferences {
            own_region: Some("eastus".into()),
            explore_share: 0.02,
            expected_output_tokens: 256,
            cache_key: None,
        };
        let tried = HashSet::new();
        let mut rng = StdRng::seed_from_u64(7);
        group.bench_with_input(BenchmarkId::new("candidate_order", size), &size, |b, _| {
            b.iter(|| candidate_order(&refs, &tried, &view, &prefs, &mut rng).len())
        });
    }
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
