#!/usr/bin/env bash
# One command for the whole test suite: set everything up, run pytest, then, where this machine
# can run them (root on x86_64), the real-SocketCAN suite in the CAN VM (make test-socketcan:
# User-Mode Linux, or QEMU where UML cannot boot) and the device VM's short form (make
# test-device-ci: Debian + systemd under QEMU, the dongle installed by scripts/install.sh; about
# 12 minutes under TCG). The whole device VM suite is make test-device (docs/install.md).
# Arguments are passed to pytest and skip the VM part (e.g. ./scripts/test.sh tests/test_store.py).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ]; then
    if [ "$(id -u)" -eq 0 ] && [ "$(uname -m)" = x86_64 ]; then
        echo "== SocketCAN suite in the CAN VM (make test-socketcan)"
        make --no-print-directory test-socketcan
        echo "== the device VM's short form (make test-device-ci)"
        make --no-print-directory test-device-ci
    else
        echo "== SocketCAN and device VM suites skipped: they need root on x86_64" \
             "(run: sudo make test-socketcan test-device-ci)"
    fi
fi
