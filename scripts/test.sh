#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit tests and the integration tests against a
# real redis-server and a local DynamoDB with Streams (moto), and the template's checks.
# Installs what is missing first. CI runs exactly this (.ci/run); docs/testing.md says what each
# step costs. The consistency checker's longer runs are scripts/soak.sh, not here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh --toolchain
cargo fmt --all -- --check
# Every relative link and anchor in README.md, docs/*.md and infra/README.md resolves (the
# handbook's pages link to each other's sections). Stdlib Python, under a second.
python3 scripts/check-links.py

# Beside the build, which needs none of it: the servers the integration tests run (apt and pip,
# waiting on the network on a fresh machine), then the template's checks (sam validate,
# cfn-lint, checkov, its intent tests: Python, offline), into a log printed when they are done.
# One after the other, so that only one of them runs apt at a time.
mkdir -p target
beside_log=target/test-sh-beside.log
(scripts/setup.sh && scripts/check-infra.sh) >"$beside_log" 2>&1 &
beside=$!
trap 'kill "$beside" 2>/dev/null || true' EXIT

# One compilation for the lints, the binaries and the tests: clippy-driver compiles the
# workspace's own crates (`RUSTC_WORKSPACE_WRAPPER`; dependencies go to rustc as usual) and lints
# them as it does, every warning an error (`CLIPPY_ARGS`, how `cargo clippy -- -D warnings`
# passes its arguments to the driver): what `cargo clippy --workspace --all-targets -- -D
# warnings` reports, without its separate `cargo check` of every dependency (1.5 minutes on 2
# cores). No incremental state for a build made once (a third less time for the workspace's
# crates). Both change how the workspace's crates are built, so a plain cargo command afterwards
# compiles them again, once.
driver="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver || true)"
if [ -z "$driver" ]; then
    echo "test.sh: no clippy-driver, so no lints: rustup component add clippy" >&2
    exit 1
fi
export RUSTC_WORKSPACE_WRAPPER="$driver"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
export CARGO_INCREMENTAL=0
# Every cargo command below selects the whole workspace with its tests, so the dependencies are
# resolved with the same features each time and compiled once.
# The library's layers: no module imports one that imports it back (crates/product-cache/tests/
# module_cycles.rs reads the crate's `use` graph).
cargo test --workspace --locked --test module_cycles
# The integration tests run the Lambda binaries under a local Runtime API and the local-stack
# command itself, so build them (with every test target) first.
cargo build --workspace --all-targets --locked

if ! wait "$beside"; then
    cat "$beside_log"
    echo "test.sh: installing the test servers or the template's checks failed (above)" >&2
    exit 1
fi
cat "$beside_log"
cargo test --workspace --locked
