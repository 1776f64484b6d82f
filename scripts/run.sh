#!/usr/bin/env bash
# The main job: runs the system locally (redis-server + a local DynamoDB with Streams) and shows a
# price change reaching readers through the stream. Installs what is missing first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh >&2
export MOTO_SERVER="${MOTO_SERVER:-$PWD/.venv/bin/moto_server}"
exec cargo run --quiet --locked -p local-stack -- "$@"
