#!/usr/bin/env bash
# Compiles requirements.txt into requirements.lock: every runtime dependency of the agent pinned
# (==) with the sha256 of each of its wheels, valid for CPython 3.11 on x86_64 and aarch64
# (one universal resolution: platform-only dependencies such as lgpio keep their markers).
# The device (scripts/install.sh, from a wheelhouse made by scripts/wheelhouse.py), the
# development venv (scripts/setup.sh) and the OTA bundles (scripts/refcloud/release.py) all
# install from that lock: what is tested is what ships.
#
#   scripts/lock.sh            re-resolve (newest releases allowed by requirements.txt)
#   scripts/lock.sh --check    exit 1 if requirements.lock is not what requirements.txt gives
#                              today (needs the package index; not part of the offline tests)
#
# Run it after editing requirements.txt, and commit both files. Wheels only (--only-binary):
# a dependency without a wheel for some target fails here, not on a Pi.
# The tool: uv (pinned below), installed on first use into its own virtualenv in the user's
# cache, never into .venv (it is not a dependency of the agent or of its tests).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

UV_VERSION=0.13.8
tools=${XDG_CACHE_HOME:-$HOME/.cache}/dongle-lock/uv-$UV_VERSION
if [ ! -x "$tools/bin/uv" ]; then
    echo "lock: installing uv $UV_VERSION into $tools" >&2
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet "uv==$UV_VERSION"
fi

out=requirements.lock
[ "${1:-}" = --check ] && out=$(mktemp) && trap 'rm -f "$out"' EXIT
# UV_CUSTOM_COMPILE_COMMAND: the header names this script, not uv's command line
UV_CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tools/bin/uv" pip compile --quiet \
    requirements.txt --universal --python-version 3.11 --generate-hashes \
    --only-binary :all: --emit-build-options --no-emit-index-url -o "$out"
if [ "${1:-}" = --check ]; then
    if ! diff -u requirements.lock "$out"; then
        echo "lock: requirements.lock is stale: run scripts/lock.sh and commit it" >&2
        exit 1
    fi
    echo "lock: requirements.lock is up to date"
fi
