#!/usr/bin/env bash
# One command for the whole test suite: set everything up, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
