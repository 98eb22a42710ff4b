#!/usr/bin/env bash
# Sets up everything the demo and the tests need on a Debian 12 machine (or Raspberry Pi OS):
# system packages (those missing of make, mosquitto, rabbitmq-server, gpsd, gpsd-clients,
# python3-venv: scripts/apt-install.sh, which waits for the dpkg lock), a virtualenv in .venv,
# the agent and its test tools. README.md ("What set-up changes on this machine") says how to
# undo it. Idempotent: a second run only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v make >/dev/null 2>&1 || need_apt+=(make)
# Tests and the demo run a real gpsd fed by gpsfake (the owner's-data tests).
command -v gpsd >/dev/null 2>&1 || [ -x /usr/sbin/gpsd ] || need_apt+=(gpsd)
command -v gpsfake >/dev/null 2>&1 || need_apt+=(gpsd-clients)
# The clustering broker of the tests (scripts/testbed/rabbitmq.py: private nodes, MQTT plugin).
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_apt+=(rabbitmq-server)
# apt-get install with sudo when not root, waiting while another process (unattended-upgrades
# on a fresh system) holds the package manager's lock
"$here/scripts/apt-install.sh" "${need_apt[@]}"
# The Debian packages enable a system-wide mosquitto and rabbitmq-server; the demo and tests
# start their own (own ports, own epmd) and never use or stop those.

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: Python >= 3.11 is needed, found {sys.version.split()[0]}")
PY

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.installed
# The runtime comes from requirements.lock (exact pins, wheel hashes: what the device and the OTA
# bundles install); the test tools from requirements-dev.txt, constrained to the lock's pins so
# that none of them can move a locked package (pip refuses instead).
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ]; then
    echo "setup: installing the agent (requirements.lock) and its test tools into .venv"
    log=.venv/pip-install.log
    constraints=.venv/lock-constraints.txt
    # the lock without hashes and options: pip does not take hashes in a constraints file
    sed -e 's/ *\\$//' -e '/^ *--hash/d' -e '/^--/d' requirements.lock >"$constraints"
    if ! { .venv/bin/python -m pip install --upgrade pip &&
           .venv/bin/python -m pip install --require-hashes -r requirements.lock &&
           .venv/bin/python -m pip install -r requirements-dev.txt -c "$constraints" &&
           .venv/bin/python -m pip install --no-deps -e . &&
           .venv/bin/python -m pip check ; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "setup: pip install failed; full log in $log" >&2
        exit 1
    fi
    touch "$stamp"
fi
