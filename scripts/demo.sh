#!/usr/bin/env bash
# One command for a new user: set everything up, then run the demo (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m scripts.demo "$@"
