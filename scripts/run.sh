#!/usr/bin/env bash
# The main job: runs the system locally (redis-server + a local DynamoDB with Streams) and shows a
# price change reaching readers through the stream. Installs what is missing first.
#
# Arguments go to the pcache command. With no subcommand (nothing, or only options such as
# --listen) it runs `pcache dev`, so the plain script starts the local system; `--help` goes to
# pcache itself, whose help lists every subcommand.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:--}" in
  -h | --help) ;;
  -*) set -- dev "$@" ;;
esac

scripts/setup.sh >&2
export MOTO_SERVER="${MOTO_SERVER:-$PWD/.venv/bin/moto_server}"
exec cargo run --quiet --locked -p pcache -- "$@"
