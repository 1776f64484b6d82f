#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit tests and the integration tests against a
# real redis-server and a local DynamoDB with Streams (moto). Installs what is missing first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo fmt --all -- --check
# Every relative link and anchor in README.md, docs/*.md and infra/README.md resolves (the
# handbook's pages link to each other's sections). Stdlib Python, under a second.
python3 scripts/check-links.py
# Every cargo command below selects the whole workspace with its tests, so the dependencies are
# resolved with the same features each time and compiled once: with `-p product-cache` for the
# first test and `-p functions -p pcache --bins` for the binaries, each step compiled the library
# (and some dependencies) again with a feature set of its own (3 to 3.5 minutes a step on 2 cores).
# The library's layers: no module imports one that imports it back (crates/product-cache/tests/
# module_cycles.rs reads the crate's `use` graph). First, since it fails in a second.
cargo test --workspace --locked --test module_cycles
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests run the Lambda binaries under a local Runtime API and the local-stack
# command itself, so build them (with every test target) first.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
# The SAM template: sam validate --lint, cfn-lint, checkov and the template's intent tests, offline.
# (`scripts/sam-build.sh`, the full arm64 cross-build, takes about 11 minutes: run it separately.)
scripts/check-infra.sh
