#!/usr/bin/env bash
# Prepare this checkout for tests and the demo: PostgreSQL and Redis server binaries (for the
# private servers the tests start; none is configured or used system-wide), then .venv with
# the package installed in editable mode. Idempotent; prints one line per step it takes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
STAMP="$VENV/.sendd-installed"
APT_UPDATED=0

say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

# Run a command with its output hidden unless it fails.
quietly() {
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "failed: $*"
    fi
    rm -f "$log"
}

# Checked before quietly(), which would hide the message.
check_root() {
    [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null \
        || die "need root to install $*: run as root or install sudo"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
    check_root "$@"
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        quietly as_root apt-get update
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

ensure_servers() {
    local missing=()
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
    command -v redis-server >/dev/null || missing+=(redis-server)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
}

# systemd-analyze, for the test that verifies systemd/sendd.service; nothing is started.
ensure_systemd_analyze() {
    command -v systemd-analyze >/dev/null || apt_install systemd
}

ensure_python() {
    command -v python3 >/dev/null || die "python3 not found: install Python 3.11 or newer"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python 3.11 or newer is needed, python3 is $(python3 -V 2>&1)"
}

# Debian splits venv/ensurepip into python3-venv; a failed attempt leaves a broken .venv.
make_venv() {
    [ -x "$VENV/bin/python" ] && return
    say "creating $VENV"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        apt_install python3-venv
        say "creating $VENV"
        quietly python3 -m venv "$VENV"
    fi
}

install_package() {
    if [ -f "$STAMP" ] && [ ! pyproject.toml -nt "$STAMP" ]; then
        return
    fi
    say "pip install -e '.[test]'"
    quietly "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$STAMP"
}

ensure_servers
ensure_systemd_analyze
ensure_python
make_venv
install_package
