# Shared by the scripts in scripts/: root, apt, python3 and the hash-stamped venvs. Sourced, not
# executed, so that failures exit the calling script, which keeps `set -euo pipefail` itself:
#
#   . scripts/lib.sh NAME    # NAME prefixes every message, as in "NAME: installing python3"
#
# Sets `repo`, the repository root, for the caller too.
# shellcheck shell=bash

lib_name="${1:?usage: . scripts/lib.sh NAME}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "$lib_name: $*" >&2; }

# Only use sudo when we actually lack root; CI and these machines run as root and may not have
# sudo at all.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root (or sudo) to run: $*"
        exit 1
    fi
}

# One `apt-get update` per process is enough to see current package lists, and it is the slow part.
apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "$@" >/dev/null
}

# A python3 that can make venvs.
ensure_python3() {
    if ! command -v python3 >/dev/null 2>&1; then
        log "installing python3"
        apt_install python3 python3-venv
    fi
    # Debian splits venv support out of python3: `import venv` can succeed while
    # `python3 -m venv` still fails for lack of ensurepip, so test for both.
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        log "installing python3-venv"
        apt_install python3-venv
        if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
            log "$(command -v python3) still lacks venv/ensurepip after installing python3-venv;" \
                "is it a python3 that Debian's packages don't serve?"
            exit 1
        fi
    fi
}

# The hash ensure_venv stamps: the pip arguments, the contents of the files they name with -r or
# -c (a pin bumped inside a requirements file must count as a change), and the interpreter's ABI
# tag, because a venv's packages live under its python's major.minor and a python3 upgraded to a
# new minor version leaves them unimportable.
venv_hash() {
    local arg prev=
    {
        python3 -c 'import sys; print(sys.implementation.cache_tag)'
        for arg in "$@"; do
            printf '%s\0' "$arg"
            case "$prev" in
                -r | --requirement | -c | --constraint) cat -- "$arg" ;;
            esac
            prev="$arg"
        done
    } | sha256sum | cut -d' ' -f1
}

# ensure_venv DIR PIP_ARGS...
#   DIR is a venv holding what `pip install PIP_ARGS...` installs into a fresh one. It is rebuilt
#   from scratch when it is missing, half-made or its stamp differs, so that a bumped pin leaves
#   no stale dependencies behind; otherwise nothing runs, not even pip.
# ensure_venv --extra NAME DIR PIP_ARGS...
#   PIP_ARGS... installed on top of the venv DIR (made before by the call above), for tools that
#   only some users of DIR need and that must run next to what DIR holds. Reinstalled when its own
#   stamp differs; a rebuild of DIR drops that stamp with it.
#
# A stamp is written only after a complete install, so an interrupted one is redone next time.
ensure_venv() {
    local extra=
    if [ "${1:-}" = --extra ]; then
        extra="$2"
        shift 2
    fi
    local dir="$1"
    shift
    local stamp="$dir/.${extra:+$extra-}requirements.sha256" want arg what=()
    want="$(venv_hash "$@")"
    for arg in "$@"; do
        case "$arg" in
            -r | --requirement) ;;
            *) what+=("${arg#"$repo"/}") ;;
        esac
    done
    # A venv left half-made (an interrupted run, or `python3 -m venv` failing for lack of
    # ensurepip) has no pip, and one whose python3 went away cannot start: neither is worth
    # repairing.
    local usable=0
    if [ -x "$dir/bin/python" ] && [ -x "$dir/bin/pip" ] && "$dir/bin/python" -c 'pass' 2>/dev/null; then
        usable=1
    fi
    if [ "$usable" -eq 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if [ -n "$extra" ]; then
        if [ "$usable" -eq 0 ]; then
            log "${dir#"$repo"/}/ is not a working venv; cannot add ${what[*]} to it"
            exit 1
        fi
        log "installing ${what[*]} into ${dir#"$repo"/}/"
    else
        log "installing ${what[*]} into ${dir#"$repo"/}/"
        rm -rf "$dir"
        python3 -m venv "$dir"
        # ensurepip bundles the pip of the python3 release, which can be years old; resolve with
        # a current one.
        "$dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    fi
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
    echo "$want" >"$stamp"
}
