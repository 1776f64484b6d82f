#!/usr/bin/env bash
# Installs what the integration tests need on a fresh Debian/Ubuntu machine that
# already has the Rust toolchain and python3: a redis-server binary and moto's
# server mode in a project-local venv. Safe to run repeatedly; it only does work
# for what is missing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
# Pinned: moto's emulation changes between releases, and tests should not change with it.
moto_spec='moto[server,dynamodb]==5.2.5'

# Only use sudo when we actually lack root; CI and these machines run as root and
# may not have sudo at all.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "setup.sh: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "$@" >/dev/null
}

# The tests spawn their own redis-server instances on free ports, so the
# system service the package may start is neither needed nor stopped here.
if ! command -v redis-server >/dev/null 2>&1; then
    echo "setup.sh: installing redis-server" >&2
    apt_install redis-server
fi

# The TLS test makes its certificates with the openssl CLI.
if ! command -v openssl >/dev/null 2>&1; then
    echo "setup.sh: installing openssl" >&2
    apt_install openssl
fi

if ! command -v python3 >/dev/null 2>&1; then
    echo "setup.sh: installing python3" >&2
    apt_install python3 python3-venv
fi

# Debian splits venv support out of python3: `import venv` can succeed while
# `python3 -m venv` still fails for lack of ensurepip, so test for both.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "setup.sh: installing python3-venv" >&2
    apt_install python3-venv
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        echo "setup.sh: $(command -v python3) still lacks venv/ensurepip after installing python3-venv;" \
            "is it a python3 that Debian's packages don't serve?" >&2
        exit 1
    fi
fi

# A venv left half-made (an interrupted run, or `python3 -m venv` failing for lack
# of ensurepip) has no pip; recreate it rather than trying to repair it.
if [ ! -x "$venv/bin/python" ] || [ ! -x "$venv/bin/pip" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
fi

if [ ! -x "$venv/bin/moto_server" ]; then
    echo "setup.sh: installing $moto_spec into $venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$moto_spec"
fi

# The test command checks formatting and lints; a minimal rustup profile lacks both.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    echo "setup.sh: adding rustfmt and clippy" >&2
    rustup component add rustfmt clippy
fi

echo "setup.sh: redis-server at $(command -v redis-server), moto_server at $venv/bin/moto_server"
