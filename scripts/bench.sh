#!/usr/bin/env bash
# Benchmarks, each printing ratios against a peer measured in the same run:
#   RPC latency/throughput/idle memory vs a bare tonic + rustls server;
#   backups vs GNU tar (gzip, zstd) and pg_dump -Fc.
# Arguments are passed to the backup benchmark (e.g. --tree-mb 256 --files 10000
# --pgbench-scale 10 --random-mb 64 for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages "${PROJECT_PACKAGES[@]}" zstd
ensure_cargo
cargo build --release --locked --bins
echo "== RPC over mutual TLS"
target/release/covet-bench
echo
echo "== backups"
target/release/covet-bench-backup "$@"
echo
echo "== agent overhead in an upgrade"
target/release/covet-demo --bench 3
echo
echo "== covetctl info over 200 agents"
target/release/covet-bench-fleet 200
