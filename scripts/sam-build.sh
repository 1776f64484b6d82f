#!/usr/bin/env bash
# `sam build` of the deployment template: both Lambda functions cross-compiled for arm64
# (provided.al2023) with cargo-lambda, no Docker. Installs what is missing first: the SAM CLI
# (via scripts/check-infra.sh --setup-only), cargo-lambda with zig into .venv-sam/, and the
# aarch64 Rust target. Then checks that each function's bootstrap is an aarch64 ELF executable.
#
# A release cross-build of the whole dependency tree: slow on a 2-core machine, so it is not part
# of every CI run (see infra/README.md). Extra arguments go to `sam build`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR/..
. scripts/lib.sh sam-build
start=$SECONDS

scripts/check-infra.sh --setup-only

# cargo-lambda (and the zig it links with) next to the SAM CLI that calls it, but not part of
# .venv-sam's own requirements: check-infra.sh, which CI runs, has no use for zig's download.
ensure_venv --extra build "$repo/.venv-sam" -r "$repo/infra/requirements-build.txt"

target=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$target"; then
    log "adding the Rust target $target"
    rustup target add "$target"
fi

# SAM finds cargo and cargo-lambda on PATH; cargo-lambda finds zig through the venv's python3
# (`python3 -m ziglang`).
export PATH="$repo/.venv-sam/bin:$PATH"
export SAM_CLI_TELEMETRY=0
build_start=$SECONDS
log "sam build (release, arm64); this takes a while"
sam build "$@"
log "sam build took $((SECONDS - build_start)) s"

# Each function's artifact must be an ELF executable for aarch64 (e_machine 183), whatever
# `file` is installed or not.
python3 - "$repo/.aws-sam/build" <<'PY'
import struct, sys
from pathlib import Path

build = Path(sys.argv[1])
failed = False
for function in ("ReadFunction", "InvalidatorFunction", "InspectorFunction"):
    path = build / function / "bootstrap"
    if not path.is_file():
        print(f"sam-build: missing {path}", file=sys.stderr)
        failed = True
        continue
    head = path.read_bytes()[:20]
    elf64 = head[:4] == b"\x7fELF" and head[4] == 2
    little = head[5] == 1
    e_type, e_machine = struct.unpack("<HH", head[16:20]) if little else (0, 0)
    if not (elf64 and little and e_type in (2, 3) and e_machine == 183):
        print(f"sam-build: {path} is not a 64-bit aarch64 ELF executable "
              f"(header {head.hex()})", file=sys.stderr)
        failed = True
        continue
    size = path.stat().st_size / 1e6
    print(f"sam-build: {path.relative_to(build.parent.parent)}: ELF 64-bit aarch64, {size:.1f} MB",
          file=sys.stderr)
sys.exit(1 if failed else 0)
PY
log "done in $((SECONDS - start)) s"
