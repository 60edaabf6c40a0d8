#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the end-to-end tests that drive
# real agents over mutual TLS. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
# The apt and dnf package kinds' tests index real local repositories.
REPO_KIND_PACKAGES=(apt-utils dnf createrepo-c)
ensure_packages "${PROJECT_PACKAGES[@]}" "${PACKAGING_PACKAGES[@]}" "${REPO_KIND_PACKAGES[@]}"
ensure_cargo
bash packaging/build --install-tools

echo "==> building"
cargo build --workspace --bins --tests --locked
# The crate roots deny unwrap/expect/panic outside cfg(test): a panic on a
# daemon or CLI path would lose the operation.
echo "==> clippy"
cargo clippy -p covet-proto -p covet-agent -p covetctl --lib --bins --locked
echo "==> testing"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast --test-threads 4
else
    cargo test --workspace --locked --no-fail-fast
fi
