//! What admission's token estimate costs per request as prompts grow: a chat body parsed as
//! JSON and counted (o200k), at 40 bytes (what `scripts/bench.sh` sends),
//! 4 KiB and 40 KiB of prompt text. `first_count` is a prompt never seen (each iteration a
//! new one); `parse_and_count` the same prompt again, as a chat client resends its history
//! (remembered counts); `first_count_tiktoken_rs` counts the same new prompts with
//! tiktoken-rs, the counter used before, for the ratio. Run: `cargo bench -p spillway-tests --bench estimate`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use spillway_gateway::proxy::request_fields::RequestFields;
use spillway_gateway::proxy::tokens::{Encoding, Operation, estimate};

/// English-like text of about `bytes` bytes.
fn prose(bytes: usize) -> String {
    let sentence = "The quick brown fox jumps over the lazy dog near the riverbank at dawn. ";
    sentence.repeat(bytes / sentence.len() + 1)[..bytes].to_string()
}

/// [`prose`] never counted before: its first bytes are `seed`'s.
fn new_prose(bytes: usize, seed: u64) -> String {
    let mut text = prose(bytes);
    let tag = format!("{seed:016x} ");
    let n = tag.len().min(text.len());
    text.replace_range(..n, &tag[..n]);
    text
}

fn body(bytes: usize) -> Vec<u8> {
    let value = json!({
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prose(bytes)}
        ],
        "max_tokens": 100
    });
    serde_json::to_vec(&value).unwrap()
}

fn estimates(c: &mut Criterion) {
    let mut group = c.benchmark_group("estimate");
    for bytes in [40usize, 4 * 1024, 40 * 1024] {
        let raw = body(bytes);
        group.throughput(Throughput::Bytes(raw.len() as u64));
        // The baseline: the whole body as a `Value` tree, as admission read it before.
        group.bench_with_input(BenchmarkId::new("parse_value", bytes), &raw, |b, raw| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(raw).unwrap());
        });
        group.bench_with_input(BenchmarkId::new("parse_fields", bytes), &raw, |b, raw| {
            b.iter(|| {
                let fields = RequestFields::parse(raw).unwrap();
                fields.check_shape(false).unwrap();
                fields.messages.map(|m| m.get().len())
            });
        });
        let mut seed = 0u64;
        group.bench_with_input(
            BenchmarkId::new("first_count", bytes),
            &bytes,
            |b, &bytes| {
                b.iter_batched(
                    || {
                        seed += 1;
                        new_prose(bytes, seed)
                    },
                    |text| Encoding::O200kBase.count(&text),
                    criterion::BatchSize::SmallInput,
                );
            },
        );
        // The reference: tiktoken-rs, the counter before (the simulator's), on the same prompts.
        let reference = tiktoken_rs::o200k_base_singleton();
        group.bench_with_input(
            BenchmarkId::new("first_count_tiktoken_rs", bytes),
            &bytes,
            |b, &bytes| {
                b.iter_batched(
                    || {
                        seed += 1;
                        new_prose(bytes, seed)
                    },
                    |text| reference.encode_with_special_tokens(&text).len(),
                    criterion::BatchSize::SmallInput,
                );
            },
        );
        group.bench_with_input(
            BenchmarkId::new("parse_and_count", bytes),
            &raw,
            |b, raw| {
                b.iter(|| {
                    let fields = RequestFields::parse(raw).unwrap();
                    estimate(
                        Encoding::O200kBase,
                        Operation::ChatCompletions,
                        Some(&fields),
                        raw.len(),
                        256,
                        u64::MAX,
                    )
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, estimates);
criterion_main!(benches);
