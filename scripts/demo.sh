#!/usr/bin/env bash
# The demo: a real agent in a throwaway sandbox, driven by covetctl over
# mutual TLS. Builds, runs, narrates, and tears everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages "${PROJECT_PACKAGES[@]}"
ensure_cargo

cargo build --release --bins --locked
BIN="$PWD/target/release"
SANDBOX=$(mktemp -d /tmp/covet-demo.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$SANDBOX"
}
trap cleanup EXIT

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
ctl() { "$BIN/covetctl" --config "$SANDBOX/client.toml" "$@"; }

step "A PKI: CA, the agent's certificate, an operator and a reader"
PKI="$SANDBOX/pki"
run "$BIN/covetctl" pki init --dir "$PKI"
run "$BIN/covetctl" pki issue-agent --dir "$PKI" --name agent --san 127.0.0.1 localhost
run "$BIN/covetctl" pki issue-client --dir "$PKI" --name alice --role operator
run "$BIN/covetctl" pki issue-client --dir "$PKI" --name bob --role reader
run "$BIN/covetctl" pki show "$PKI/alice.crt"

step "A stand-in app serving /health on loopback"
mkdir -p "$SANDBOX/app"
echo '{"status":"ok","version":"0.1.9"}' > "$SANDBOX/app/health"
APP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$SANDBOX/app" "$APP_PORT" >/dev/null 2>&1 &
PIDS+=($!)

step "The agent, on a free loopback port"
cat > "$SANDBOX/agent.toml" <<TOML
listen = "127.0.0.1:0"
state_dir = "$SANDBOX/state"
backup_dir = "$SANDBOX/backups"
[tls]
ca = "$PKI/ca.crt"
cert = "$PKI/agent.crt"
key = "$PKI/agent.key"
deny = "$PKI/revoked.txt"
[systemd]
bus = "session"
[[app]]
name = "covet"
unit = "covet.service"
[app.health]
url = "http://127.0.0.1:$APP_PORT/health"
json_field = "status"
json_value = "ok"
TOML
run "$BIN/covet-agent" check-config --config "$SANDBOX/agent.toml"
"$BIN/covet-agent" --config "$SANDBOX/agent.toml" 2>"$SANDBOX/agent.log" &
AGENT_PID=$!
PIDS+=($AGENT_PID)
for _ in $(seq 100); do [ -s "$SANDBOX/state/agent.addr" ] && break; sleep 0.1; done
ENDPOINT=$(cat "$SANDBOX/state/agent.addr")
echo "agent listening on $ENDPOINT"

step "Contexts for covetctl"
run ctl config add-context alice --endpoint "$ENDPOINT" --ca "$PKI/ca.crt" --cert "$PKI/alice.crt" --key "$PKI/alice.key"
run ctl config add-context bob --endpoint "$ENDPOINT" --ca "$PKI/ca.crt" --cert "$PKI/bob.crt" --key "$PKI/bob.key"
run ctl config show

step "What the agent knows about its host"
run ctl info
run ctl metrics
run ctl -o json health covet

step "Roles decide: bob is a reader and may not run ad-hoc probes"
run ctl --context bob probe tcp "127.0.0.1:$APP_PORT" || echo "(refused, as it should be)"

step "Revoke bob and reload the agent (SIGHUP)"
run "$BIN/covetctl" pki revoke --dir "$PKI" "$PKI/bob.crt"
kill -HUP "$AGENT_PID"; sleep 0.5
run ctl --context bob info || echo "(refused, as it should be)"

step "The audit log"
cat "$SANDBOX/state/audit.log"
echo
echo "demo finished; the sandbox is removed"
