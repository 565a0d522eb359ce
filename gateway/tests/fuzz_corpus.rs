//! The fuzzing corpus (`fuzz/corpus/<target>/`, seeds plus what `scripts/fuzz.sh` found,
//! crashes included once fixed) replayed on every test run, on stable Rust: a parser that
//! regresses on any input the fuzzer ever tried fails here.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target} fails on {}", path.display());
        inputs += 1;
    }
    assert!(inputs > 0, "the {target} corpus is empty");
}

#[test]
fn sse_usage_corpus() {
    replay("sse_usage", spillway_gateway::fuzzing::sse_and_usage);
}

#[test]
fn azure_headers_corpus() {
    replay("azure_headers", spillway_gateway::fuzzing::azure_headers);
}

#[test]
fn admission_corpus() {
    replay("admission", spillway_gateway::fuzzing::admission);
}

#[test]
fn config_corpus() {
    replay("config", spillway_gateway::fuzzing::config);
}
