#!/usr/bin/env bash
# The benchmark (docs/benchmarks.md): every figure of the performance budget against its
# baseline in the same run, on loopback and through a proxy adding ElastiCache's cross-AZ round
# trip. Starts its own redis-server, Redis Cluster and moto; prints a table, rewrites
# BENCHMARKS.md and exits 1 if a budget is missed; then runs scripts/soak.sh (not with --quick or
# --only), and fails if it fails. Not part of scripts/test.sh.
#
#   scripts/bench.sh [--quick] [--json PATH] [--no-write] [--only NAME[,NAME...]]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh >&2
export MOTO_SERVER="${MOTO_SERVER:-$PWD/.venv/bin/moto_server}"
# Release builds, as deployed: the cold-start figure runs the function binaries built here.
# Two builds, not one: built together, the functions would get the features the benchmark's
# dependencies turn on (a bigger binary than `sam build` makes).
cargo build --release --locked -p functions
cargo build --release --locked -p bench
status=0
"${CARGO_TARGET_DIR:-target}/release/bench" "$@" || status=$?
# Then the soak (scripts/soak.sh: the checker runs CI leaves out), unless only some figures or
# the quick pass were asked for. Either failing fails the command.
case " $* " in
  *" --quick "* | *" --only "* | *" --only="*) ;;
  *) scripts/soak.sh || status=$? ;;
esac
exit "$status"
