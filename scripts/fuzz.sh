#!/usr/bin/env bash
# Runs the property tests that feed hostile archives and env files to the
# agent's extractors and parsers (every test named fuzz_*) for a long time,
# one hour in all by default, two at a time:
#   bash scripts/fuzz.sh [SECONDS]
# CI runs the same tests with a bounded number of cases (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
total="${1:-3600}"
threads=2
cargo test -p covet-agent --locked --release --lib --no-run
count=$(cargo test -p covet-agent --locked --release --lib -- --list fuzz_ 2>/dev/null | grep -c ': test$' || true)
[ "$count" -gt 0 ] || { echo "no fuzz_ tests found" >&2; exit 1; }
per_test=$(( total * threads / count ))
echo "==> $count properties, ${per_test}s each, $threads at a time"
COVET_FUZZ_SECS="$per_test" cargo test -p covet-agent --locked --release --lib fuzz_ -- --nocapture --test-threads "$threads"
