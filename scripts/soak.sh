#!/usr/bin/env bash
# The soak (docs/testing.md#the-soak): the consistency checker's runs that scripts/test.sh leaves
# out, then, with SOAK_ROUNDS above 1, every checker run again that many times. CI runs every run
# with a guard off, one clean run per deployment and the game day; the runs here repeat one of
# those with a feature added (tests/it/checker.rs says which), about two minutes on 2 cores (104 s once built).
# scripts/bench.sh runs it after its figures. Installs what is missing first.
#
#   scripts/soak.sh                                 # the runs CI leaves out, once
#   SOAK_ROUNDS=5 scripts/soak.sh                   # and then every checker run, 5 times
#   CHECKER_OPS=50000 scripts/soak.sh               # each run ten times longer
#
# Stops at the first failing round; a failed run prints its report and its seed
# (CHECKER_SEED replays its random choices).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rounds="${SOAK_ROUNDS:-1}"
case "$rounds" in
  '' | *[!0-9]*) echo "soak.sh: SOAK_ROUNDS must be a whole number, not '$rounds'" >&2; exit 2 ;;
esac

scripts/setup.sh
# The checker's runs marked `#[ignore = "soak: ..."]` (the suite's one other ignored test,
# a measurement in replicas.rs, is not under checker::).
cargo test --workspace --locked -- --ignored checker::
for round in $(seq 2 "$rounds"); do
    echo "soak.sh: round $round of $rounds: every checker run" >&2
    cargo test --workspace --locked -- --include-ignored checker::
done
