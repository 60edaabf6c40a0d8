# Shared by scripts/*.sh: install what the project needs on a fresh Debian 12.

# Installs Debian packages that are missing (needs root or sudo).
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "==> installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Makes sure cargo is on PATH (rustup installs into ~/.cargo/bin).
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || {
        echo "cargo not found: install Rust (https://rustup.rs) first" >&2
        exit 1
    }
}

# The packages the agent's real parts need: C toolchain for ring, Python for
# the sample app, systemd + dbus + journald (the test sandboxes), util-linux
# (unshare, setpriv), PostgreSQL, libsqlite3-dev (the agent links
# Debian's libsqlite3 for SQLite databases), and the Prometheus Python
# client, whose text parser a test reads the agent's /metrics with;
# MariaDB (the mysql kind's tests) and nginx (the blue-green tests).
PROJECT_PACKAGES=(build-essential ca-certificates zstd python3 python3-venv systemd dbus dbus-user-session util-linux postgresql libsqlite3-dev mariadb-server mariadb-client nginx-light python3-prometheus-client)

# What the packaging build (dpkg-deb, dpkg-shlibdeps, strip, rpmbuild) and its
# tests (lintian, a booted Debian 12) need; `packaging/build --install-tools`
# installs them.
PACKAGING_PACKAGES=(dpkg-dev binutils python3 rpm lintian debootstrap systemd-container)
