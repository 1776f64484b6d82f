#!/usr/bin/env bash
# Offline checks of the deployment template (infra/template.yaml), as CI runs them:
#   sam validate --lint, cfn-lint, checkov (no unexplained findings), pytest infra/tests.
# Installs what is missing first: two project-local venvs, .venv-sam/ (the SAM CLI, whose pins
# conflict with checkov's) and .venv-infra/ (cfn-lint, checkov, pytest, the SAM translator), each
# from its pinned requirements file under infra/. Safe to rerun: a venv is rebuilt only when its
# requirements file changed or it is broken.
#
#   scripts/check-infra.sh               install if needed, then run every check
#   scripts/check-infra.sh --setup-only  install if needed (scripts/sam-build.sh uses this)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR/..
. scripts/lib.sh check-infra

setup_only=0
case "${1:-}" in
    --setup-only) setup_only=1 ;;
    "") ;;
    *) echo "usage: $0 [--setup-only]" >&2; exit 2 ;;
esac

ensure_python3
# The tests read Cargo.toml with tomllib, new in Python 3.11.
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "$(command -v python3) is $(python3 --version 2>&1); need Python 3.11 or newer"
    exit 1
fi

t0=$SECONDS
ensure_venv "$repo/.venv-sam" -r "$repo/infra/requirements-sam.txt"
ensure_venv "$repo/.venv-infra" -r "$repo/infra/requirements-infra.txt"
log "tools ready ($((SECONDS - t0)) s)"
[ "$setup_only" -eq 1 ] && exit 0

# Nothing here may reach AWS or any other service: no telemetry, no checkov platform download.
export SAM_CLI_TELEMETRY=0
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"

step() {
    local name="$1" start=$SECONDS
    shift
    log "== $name"
    "$@"
    log "   $name passed ($((SECONDS - start)) s)"
}

step "sam validate --lint" \
    .venv-sam/bin/sam validate --lint --template infra/template.yaml --region us-east-1
step "cfn-lint" \
    .venv-infra/bin/cfn-lint infra/template.yaml
# Every skipped finding is a `checkov: skip` with its reason in the resource's Metadata; any
# other finding fails here. --skip-download: offline, no Prisma Cloud guidelines.
step "checkov" \
    .venv-infra/bin/checkov -f infra/template.yaml --framework cloudformation --quiet --compact --skip-download
step "pytest infra/tests" \
    .venv-infra/bin/python -m pytest infra/tests -q -p no:cacheprovider
log "all infra checks passed ($((SECONDS - t0)) s)"
