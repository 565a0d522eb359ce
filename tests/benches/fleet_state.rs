//! One acquire and one settle on each store, with every bucket of the budget window in use, at
//! 60 and 600 buckets; and, on the same Redis data, the previous full-scan acquire as the
//! baseline. Run: `cargo bench -p spillway-tests --bench fleet_state`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fred::prelude::*;
use fred::types::scripts::Script;
use spillway_shared::{
    Admission, BackendId, Candidate, ClockControl, EmbeddedState, FleetState, KeySchema, PoolName,
    Receipt, RedisState, UpstreamHints, Windows,
};
use spillway_tests::redis_server::RedisServer;

const START_MS: u64 = 1_700_000_000_000;

fn windows(buckets: u32) -> Windows {
    Windows {
        budget: Duration::from_secs(60),
        budget_buckets: buckets,
        ..Windows::default()
    }
}

fn candidate() -> [Candidate; 1] {
    [Candidate {
        tokens_per_window: Some(u64::MAX / 4),
        ..Candidate::unlimited(BackendId::new("ptu"))
    }]
}

fn receipt(reservation: spillway_shared::Reservation) -> Receipt {
    Receipt {
        reservation,
        tokens: 1,
        latency: None,
        hints: UpstreamHints::default(),
        backoff: None,
    }
}

/// Time `iters` settles, each of a fresh reservation (its acquire not timed).
async fn settle_each(store: &dyn FleetState, pool: &PoolName, iters: u64) -> Duration {
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        let reservation = admit(store, pool).await;
        let started = std::time::Instant::now();
        store
            .settle(pool, &BackendId::new("ptu"), receipt(reservation))
            .await
            .unwrap();
        timed += started.elapsed();
    }
    timed
}

async fn admit(store: &dyn FleetState, pool: &PoolName) -> spillway_shared::Reservation {
    match store.acquire(pool, &candidate(), 1).await.unwrap() {
        Admission::Admitted { reservation, .. } => reservation,
        other => panic!("not admitted: {other:?}"),
    }
}

fn redis(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = RedisServer::start();
    let pool = PoolName::new("bench");
    let mut group = c.benchmark_group("redis");
    for buckets in [60u32, 600] {
        let prefix = format!("bench{buckets}");
        let w = windows(buckets);
        let _inside = rt.enter(); // the client connects in the background, on this runtime
        let store = RedisState::new(&server.url(), &prefix, w, Duration::from_secs(2)).unwrap();
        rt.block_on(store.ready(Duration::from_secs(10))).unwrap();
        // One admission in every bucket of the window, then the clock in its last bucket.
        for k in 0..u64::from(buckets) {
            store.set_clock_ms(START_MS + k * w.bucket_ms());
            rt.block_on(admit(&store, &pool));
        }
        store.set_clock_ms(START_MS + (u64::from(buckets) - 1) * w.bucket_ms() + 1);

        group.bench_with_input(BenchmarkId::new("acquire", buckets), &buckets, |b, _| {
            b.to_async(&rt).iter(|| admit(&store, &pool));
        });
        group.bench_with_input(BenchmarkId::new("settle", buckets), &buckets, |b, _| {
            b.to_async(&rt)
                .iter_custom(|iters| settle_each(&store, &pool, iters));
        });

        // Baseline: the previous script on the same keys and arguments.
        let scan = Script::from_lua(include_str!("acquire_scan.lua"));
        rt.block_on(scan.load(store.client())).unwrap();
        let k = KeySchema::new(&prefix).member(&pool, &BackendId::new("ptu"));
        let keys = vec![
            format!("{prefix}:{{bench}}:pending"),
            k.backoff.clone(),
            k.usage.clone(),
            k.hints.clone(),
        ];
        let clock = (START_MS + (u64::from(buckets) - 1) * w.bucket_ms() + 1).to_string();
        let args: Vec<String> = [
            "1".to_string(),
            w.bucket_ms().to_string(),
            "60000".into(),
            clock,
            "1000".into(),
            "5000".into(),
            String::new(),
            (u64::MAX / 4).to_string(),
            "-1".into(),
            "-1".into(),
        ]
        .into();
        // The snapshot every replica reads per pool twice a second, and its baseline (the
        // previous script, reading whole hashes).
        let members = candidate();
        group.bench_with_input(BenchmarkId::new("snapshot", buckets), &buckets, |b, _| {
            b.to_async(&rt)
                .iter(|| async { store.snapshot(&pool, &members).await.unwrap() });
        });
        let snapshot_scan = Script::from_lua(include_str!("snapshot_scan.lua"));
        rt.block_on(snapshot_scan.load(store.client())).unwrap();
        let snapshot_keys = vec![
            k.backoff.clone(),
            k.usage.clone(),
            k.latency.clone(),
            k.hints.clone(),
        ];
        let snapshot_args: Vec<String> = vec![
            w.bucket_ms().to_string(),
            "60000".into(),
            w.slot_ms().to_string(),
            (w.latency.as_millis() as u64).to_string(),
            (START_MS + (u64::from(buckets) - 1) * w.bucket_ms() + 1).to_string(),
        ];
        group.bench_with_input(
            BenchmarkId::new("snapshot_scan", buckets),
            &buckets,
            |b, _| {
                b.to_async(&rt).iter(|| async {
                    let _: Value = snapshot_scan
                        .evalsha_with_reload(
                            store.client(),
                            snapshot_keys.clone(),
                            snapshot_args.clone(),
                        )
                        .await
                        .unwrap();
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("acquire_scan", buckets),
            &buckets,
            |b, _| {
                b.to_async(&rt).iter(|| async {
                    let _: Value = scan
                        .evalsha_with_reload(store.client(), keys.clone(), args.clone())
                        .await
                        .unwrap();
                });
            },
        );
    }
    group.finish();
}

fn embedded(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pool = PoolName::new("bench");
    let mut group = c.benchmark_group("embedded");
    for buckets in [60u32, 600] {
        let w = windows(buckets);
        let store = EmbeddedState::new(w);
        for _ in 0..buckets {
            rt.block_on(admit(&store, &pool));
            store.advance_clock(Duration::from_millis(w.bucket_ms()));
        }
        group.bench_with_input(BenchmarkId::new("acquire", buckets), &buckets, |b, _| {
            b.to_async(&rt).iter(|| admit(&store, &pool));
        });
        group.bench_with_input(BenchmarkId::new("settle", buckets), &buckets, |b, _| {
            b.to_async(&rt)
                .iter_custom(|iters| settle_each(&store, &pool, iters));
        });
    }
    group.finish();
}

criterion_group!(benches, redis, embedded);
criterion_main!(benches);
