#!/usr/bin/env bash
# Benchmarks, each printing ratios against a peer measured in the same run:
#   RPC latency/throughput/idle memory vs a bare tonic + rustls server;
#   backups vs GNU tar (gzip, zstd), pg_dump -Fc and mariadb-dump (alone,
#   | gzip, | zstd -T0);
#   the upgrade and its rollback vs an Ansible playbook and bare commands
#   (and the agent's own overhead per upgrade);
#   failed requests during a blue-green upgrade and rollback behind nginx vs
#   the restart strategy, and the switch-back time.
# Arguments are passed to the backup benchmark (e.g. --tree-mb 256 --files 10000
# --pgbench-scale 10 --random-mb 64 --mysql-mb 128 for a quick run).
# COVET_BENCH_ONLY=upgrade runs only the upgrade benchmark, =backup only the
# backup one (with the arguments, e.g. --only db --pgbench-scale 50, or
# --only mysql --mysql-mb 1024);
# COVET_BENCH_ROUNDS=N sets its rounds (default 3). COVET_BENCH_ONLY=fleet runs
# only the 200-agent info row (covetctl and the covet.agent collection).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages "${PROJECT_PACKAGES[@]}" zstd tar
ensure_cargo

# The Ansible peer: ansible (with its bundled collections) and psycopg2 from
# PyPI in a venv of Debian's Python, made once and reused while the pinned
# requirements are unchanged.
ensure_ansible() {
    local venv=target/bench-ansible req=scripts/bench/requirements.txt
    if [ -x "$venv/bin/ansible-playbook" ] && cmp -s "$req" "$venv/requirements.txt"; then
        return 0
    fi
    echo "==> installing Ansible into $venv (scripts/bench/requirements.txt)"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$req"
    cp "$req" "$venv/requirements.txt"
}

# The covet.agent collection for the fleet row: ansible-core and grpcio in
# their own venv (clients/ansible/requirements.txt), the collection built by
# clients/ansible/build.sh and installed under target/bench-collection/.
ensure_collection() {
    local dir=target/bench-collection req=clients/ansible/requirements.txt
    if ! { [ -x "$dir/venv/bin/python" ] && cmp -s "$req" "$dir/venv/requirements.txt"; }; then
        echo "==> installing ansible-core and grpcio into $dir/venv ($req)"
        rm -rf "$dir/venv"
        /usr/bin/python3 -m venv "$dir/venv"
        "$dir/venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$req"
        cp "$req" "$dir/venv/requirements.txt"
    fi
    PYTHON="$dir/venv/bin/python" clients/ansible/build.sh "$dir/build" >/dev/null
    ANSIBLE_COLLECTIONS_PATH="$dir/collections" "$dir/venv/bin/python" -m ansible.cli.galaxy collection install --force \
        -p "$dir/collections" "$dir"/build/covet-agent-*.tar.gz >/dev/null
}

only="${COVET_BENCH_ONLY:-}"
rounds="${COVET_BENCH_ROUNDS:-3}"
case "$only" in
upgrade)
    cargo build --release --locked -p covet-agent -p covetctl -p covet-tests \
        --bin covet-agent --bin covetctl --bin covet-bench-upgrade
    ;;
backup) cargo build --release --locked -p covet-tests --bin covet-bench-backup ;;
fleet)
    cargo build --release --locked -p covet-agent -p covetctl -p covet-tests \
        --bin covet-agent --bin covetctl --bin covet-bench-fleet
    ensure_collection
    target/release/covet-bench-fleet 200 \
        --ansible target/bench-collection/venv/bin/python target/bench-collection/collections
    exit 0
    ;;
"") cargo build --release --locked --bins ;;
*)
    echo "COVET_BENCH_ONLY is upgrade, backup, fleet or unset, not $only" >&2
    exit 2
    ;;
esac

if [ -z "$only" ]; then
    echo "== RPC over mutual TLS"
    target/release/covet-bench
    echo
fi
if [ -z "$only" ] || [ "$only" = backup ]; then
    echo "== backups"
    target/release/covet-bench-backup "$@"
    echo
fi
if [ "$only" = backup ]; then
    exit 0
fi
ensure_ansible
echo "== upgrade and rollback: covetctl vs an Ansible playbook vs bare commands"
target/release/covet-bench-upgrade --rounds "$rounds" --ansible target/bench-ansible
if [ -z "$only" ]; then
    echo
    ensure_collection
    echo "== covetctl info and covet.agent.info (Ansible, forks 50) over 200 agents"
    target/release/covet-bench-fleet 200 \
        --ansible target/bench-collection/venv/bin/python target/bench-collection/collections
    echo
    echo "== zero downtime: blue-green vs the restart strategy behind nginx, 200 req/s"
    target/release/covet-bench-bluegreen 200
fi
