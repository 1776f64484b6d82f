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
repo="$PWD"

setup_only=0
case "${1:-}" in
    --setup-only) setup_only=1 ;;
    "") ;;
    *) echo "usage: $0 [--setup-only]" >&2; exit 2 ;;
esac

log() { echo "check-infra: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else log "need root (or sudo) to run: $*"; exit 1
    fi
}

# python3 >= 3.11 (the tests read Cargo.toml with tomllib) with a working venv module. Debian
# ships ensurepip separately, so `import venv` alone proves nothing.
if ! command -v python3 >/dev/null 2>&1; then
    log "installing python3"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "$(command -v python3) is $(python3 --version 2>&1); need Python 3.11 or newer"
    exit 1
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    log "installing python3-venv"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi

# ensure_venv DIR REQUIREMENTS: DIR holds exactly what REQUIREMENTS pins. The stamp records the
# requirements file's hash after a complete install, so an interrupted install is redone.
ensure_venv() {
    local dir="$1" req="$2" stamp="$1/.requirements.sha256" want
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    if [ -x "$dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$dir/bin/python" -c 'pass' 2>/dev/null; then
        return 0
    fi
    log "installing ${req#"$repo"/} into ${dir#"$repo"/}/"
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$dir/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
    echo "$want" >"$stamp"
}

t0=$SECONDS
ensure_venv "$repo/.venv-sam" "$repo/infra/requirements-sam.txt"
ensure_venv "$repo/.venv-infra" "$repo/infra/requirements-infra.txt"
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
