#!/usr/bin/env bash
# One command for the whole test suite: set everything up, run pytest, then the real-SocketCAN
# suite in the CAN VM (make test-socketcan: User-Mode Linux, or QEMU where UML cannot boot) and the
# short form of the device VM tests (make test-device-short: Debian + systemd under QEMU, the dongle
# installed by scripts/install.sh) where this machine can run them.
# Arguments are passed to pytest and skip the VM part (e.g. ./scripts/test.sh tests/test_store.py).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ]; then
    if [ "$(id -u)" -eq 0 ] && [ "$(uname -m)" = x86_64 ]; then
        echo "== SocketCAN suite in the CAN VM (make test-socketcan)"
        make --no-print-directory test-socketcan
        echo "== the installed dongle in the device VM, short form (make test-device-short)"
        make --no-print-directory test-device-short
    else
        echo "== SocketCAN and device VM suites skipped: they need root on x86_64 (run: sudo make test-socketcan test-device-short)"
    fi
fi
