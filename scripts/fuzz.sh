#!/usr/bin/env bash
# Fuzz the parsers that face the network (fuzz/fuzz_targets/), one target at a time.
#
#   scripts/fuzz.sh                 # every target, 600 s each
#   scripts/fuzz.sh 60              # every target, 60 s each
#   scripts/fuzz.sh 600 wire        # one target
#   scripts/fuzz.sh 600 wire -rss_limit_mb=4096   # extra arguments go to libFuzzer
#
# Installs cargo-fuzz (and uses the nightly toolchain, which it needs) when missing. Runs at
# nice 19 with one job and one worker, so builds and benchmarks on the same machine keep the
# CPU. Starts from the committed seeds in fuzz/corpus/<target>/seed-* with the dictionary in
# fuzz/dicts/<target>.dict; the corpus libFuzzer grows beside the seeds and any crash in
# fuzz/artifacts/<target>/ are not committed. Each run's log is fuzz/logs/<target>.log; the
# last line of the summary is libFuzzer's "#N DONE cov: ... exec/s: ..." for that target.
# Exits non-zero if any target found a crash, a timeout or a leak.
#
# FUZZ_TIMEOUT (seconds, default 120) is libFuzzer's per-input wall-clock limit. At nice 19 on
# a busy machine a fuzzer can be starved for tens of seconds, which a 10 s limit reports as a
# hang; every input takes milliseconds, so a real endless loop still trips 120 s. Before
# believing a timeout, time the input alone: fuzz/target/*/release/<target> <file>.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-600}
shift || true
targets=()
if [ $# -gt 0 ] && [[ $1 != -* ]]; then
    targets=("$1")
    shift
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz
fi
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

mkdir -p logs
failed=0
for t in "${targets[@]}"; do
    dict=()
    [ -f "dicts/$t.dict" ] && dict=("-dict=dicts/$t.dict")
    echo "== $t: ${seconds}s" >&2
    if nice -n 19 cargo +nightly fuzz run "$t" -- \
        -max_total_time="$seconds" -jobs=1 -workers=1 -rss_limit_mb=2048 -timeout="${FUZZ_TIMEOUT:-120}" \
        -print_final_stats=1 "${dict[@]}" "$@" >"logs/$t.log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed=1
    fi
    echo "$t: $status: $(grep -E '^#[0-9]+[[:space:]]+DONE|SUMMARY: libFuzzer' "logs/$t.log" | tail -n 1)" >&2
done
exit "$failed"
