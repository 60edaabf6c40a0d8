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

# Clippy lints the workspace's crates while they are built, as the rustc
# wrapper: one compilation instead of a build and a second, check-only pass
# over every dependency. The crate roots deny unwrap/expect/panic outside
# cfg(test) (a panic on a daemon or CLI path would lose the operation), so a
# lint error fails the build. Exported: the test run's build must match.
clippy_driver="$(rustc --print sysroot)/bin/clippy-driver"
if [ -x "$clippy_driver" ]; then
    export RUSTC_WORKSPACE_WRAPPER="$clippy_driver"
else
    echo "clippy-driver not found next to cargo (rustup component add clippy)" >&2
    exit 1
fi
echo "==> building and linting ($SECONDS s)"
cargo build --workspace --bins --tests --locked
echo "==> testing ($SECONDS s)"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast --test-threads 4
else
    cargo test --workspace --locked --no-fail-fast
fi
echo "==> done ($SECONDS s)"
