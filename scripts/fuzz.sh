#!/usr/bin/env bash
# Fuzz each target for a bounded time (default 60 s each) with cargo-fuzz on nightly.
#   scripts/fuzz.sh [seconds] [target ...]
# New inputs that reach new code land in fuzz/corpus/<target>/ (commit them: the corpus is
# replayed by `cargo test`, gateway/tests/fuzz_corpus.rs); a crash is saved under
# fuzz/artifacts/<target>/ and fails this script. Targets: sse_usage, azure_headers,
# admission, config.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(sse_usage azure_headers admission config)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${seconds}s"
    mkdir -p "fuzz/corpus/$target"
    # -max_len bounds an input; -rss_limit_mb keeps a runaway allocation a finding, not an OOM kill.
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10
done
echo "fuzz.sh: no crash in ${#targets[@]} target(s); corpus: $(find fuzz/corpus -type f | wc -l) inputs"
