#!/usr/bin/env bash
# Benchmarks with ratios against a peer measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages "${PROJECT_PACKAGES[@]}"
ensure_cargo
cargo build --release --locked --bins
exec target/release/covet-bench "$@"
