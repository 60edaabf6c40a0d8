#!/usr/bin/env bash
# The demo: a real upgrade and a real automatic rollback of the sample app,
# in a throwaway sandbox (systemd user manager + journald, PostgreSQL, PKI,
# agent), narrated and checked; then a blue-green upgrade and its rollback
# behind nginx under 200 requests/s. Installs what it needs; tears everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages "${PROJECT_PACKAGES[@]}"
ensure_cargo
cargo build --release --locked --bins
exec target/release/covet-demo
