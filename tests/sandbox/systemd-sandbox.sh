#!/bin/sh
# A private systemd user manager with its own journald, for tests.
#
# Usage (from tests/src/sandbox.rs):
#   setsid unshare --mount --propagation private [--pid --fork --kill-child --mount-proc] \
#       sh systemd-sandbox.sh SANDBOX_DIR [CGROUP_NAME]
#
# Must run as root in a fresh private mount namespace: the mounts below are
# invisible to the host. Layout under SANDBOX_DIR:
#   run/                     XDG_RUNTIME_DIR (user bus at run/bus, manager at run/systemd/private)
#   config/systemd/user/     unit files
#   journal/<machine-id>/    journal files written by the sandbox's journald
#   manager.pid              the manager's PID (namespace-local in a PID namespace)
#
# The script stays as the parent of journald and the manager (and as PID 1
# when run in a PID namespace): SIGTERM to it is forwarded to the manager,
# which stops its services and exits; then the script exits, which in a PID
# namespace makes the kernel kill everything left in it.
set -eu

SANDBOX=$1
CGROUP=${2:-}

log() { echo "systemd-sandbox: $*" >&2; }

# As PID 1 of a PID namespace, signals without a handler are ignored: handle
# SIGTERM from the start, forwarding it to the manager once there is one.
manager=
terminate() {
    if [ -n "$manager" ]; then
        kill -TERM "$manager" 2>/dev/null || true
    else
        exit 143
    fi
}
trap terminate TERM INT HUP

# Own cgroup, so that two sandboxes' managers do not share (and kill) each
# other's app.slice/*.service cgroups. Hybrid and legacy hierarchies both.
if [ -n "$CGROUP" ]; then
    for root in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
        if [ -w "$root/cgroup.procs" ]; then
            mkdir -p "$root/$CGROUP"
            echo $$ >"$root/$CGROUP/cgroup.procs"
            # Pure cgroup2: /sys/fs/cgroup is the hierarchy, stop there.
            [ "$root" = /sys/fs/cgroup ] && break
        fi
    done
fi

# systemd --user refuses to run unless /run/systemd/system exists.
mkdir -p /run/systemd /run/log/journal
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/journal "$SANDBOX/journal"
mount --bind "$SANDBOX/journal" /run/log/journal

# Volatile storage only (never the host's /var/log/journal), no kernel
# messages, and no rate limit that could drop a chatty test service's lines.
cat >"$SANDBOX/journald.conf" <<'CONF'
[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
CONF
if [ -e /etc/systemd/journald.conf ]; then
    mount --bind "$SANDBOX/journald.conf" /etc/systemd/journald.conf
fi

/lib/systemd/systemd-journald &
journald=$!
# Services started before journald listens would log to nowhere.
i=0
while [ ! -S /run/systemd/journal/stdout ]; do
    i=$((i + 1))
    if [ $i -gt 200 ]; then
        log "journald did not create /run/systemd/journal/stdout"
        exit 1
    fi
    sleep 0.05
done

mkdir -p "$SANDBOX/run" "$SANDBOX/config/systemd/user" "$SANDBOX/data" "$SANDBOX/state" "$SANDBOX/cache"
chmod 0700 "$SANDBOX/run"
export XDG_RUNTIME_DIR="$SANDBOX/run"
export XDG_CONFIG_HOME="$SANDBOX/config"
export XDG_DATA_HOME="$SANDBOX/data"
export XDG_STATE_HOME="$SANDBOX/state"
export XDG_CACHE_HOME="$SANDBOX/cache"
export HOME="$SANDBOX"
unset DBUS_SESSION_BUS_ADDRESS NOTIFY_SOCKET INVOCATION_ID

/lib/systemd/systemd --user &
manager=$!
echo "$manager" >"$SANDBOX/manager.pid"
log "manager pid $manager (pid of this script: $$)"

# `wait` returns early when a trapped signal arrives: keep waiting.
status=0
while kill -0 "$manager" 2>/dev/null; do
    status=0
    wait "$manager" || status=$?
done
log "manager exited ($status)"
# Let journald close its files cleanly before the namespace goes away.
kill -TERM "$journald" 2>/dev/null || true
wait "$journald" || true
exit "$status"
