//! What relaying a streamed answer costs per SSE event: a chat stream of 40 content events,
//! its usage chunk and `[DONE]` (Azure's shape, `"usage":null` in every chunk as when the
//! gateway asks for usage) through the usage meter, as one chunk and as one chunk per event,
//! with the usage the gateway added stripped (the client did not ask) and passed on (it
//! did). Time per event (throughput in elements). `scripts/instructions.sh` gives the same
//! in instructions through the whole gateway. Run: `cargo bench -p spillway-tests --bench relay`.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use spillway_gateway::proxy::fuzz_access::UsageMeter;

const EVENTS: usize = 40;

/// The stream's events, each its own bytes.
fn events() -> Vec<Bytes> {
    let head = r#"{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":["#;
    let mut out: Vec<Bytes> = (0..EVENTS)
        .map(|i| {
            Bytes::from(format!(
                "data: {head}{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
            ))
        })
        .collect();
    out.push(Bytes::from(format!(
        "data: {head}],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":{EVENTS},\"total_tokens\":{}}}}}\n\n",
        9 + EVENTS
    )));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

fn relay(c: &mut Criterion) {
    let events = events();
    let whole = Bytes::from(events.concat());
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Elements(EVENTS as u64));
    for strip in [true, false] {
        let arm = if strip {
            "usage stripped"
        } else {
            "usage passed on"
        };
        group.bench_with_input(BenchmarkId::new("one chunk", arm), &strip, |b, &strip| {
            b.iter(|| {
                let mut meter = UsageMeter::new(true, strip);
                let out = meter.relay(whole.clone());
                assert!(meter.finish().is_some());
                out
            });
        });
        group.bench_with_input(
            BenchmarkId::new("a chunk per event", arm),
            &strip,
            |b, &strip| {
                b.iter(|| {
                    let mut meter = UsageMeter::new(true, strip);
                    let relayed: usize = events.iter().map(|e| meter.relay(e.clone()).len()).sum();
                    assert!(meter.finish().is_some());
                    relayed
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, relay);
criterion_main!(benches);
