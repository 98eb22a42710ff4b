#!/usr/bin/env bash
# Installs the dongle agent on a Raspberry Pi OS (64-bit, Debian 12 "bookworm") device, from this
# checkout. See docs/install.md for the whole procedure (SD card to running, provisioned dongle).
#
#   sudo scripts/install.sh [--dry-run] [--wheel FILE] [--wheelhouse DIR]
#
#   --dry-run         print every change it would make, change nothing (no root needed)
#   --wheel FILE      install this built wheel of the agent instead of the checkout's source
#   --wheelhouse DIR  install offline: the dependencies come only from DIR, a wheelhouse made
#                     on any PC with `make wheelhouse ARCH=aarch64 WHEELHOUSE=DIR`
#
# Dependencies: exactly the pins and wheel hashes of requirements.lock (`pip --require-hashes`),
# the lock the OTA bundles are built from; from DIR/requirements.txt (the same pins, resolved
# for DIR's architecture) with --wheelhouse. The agent itself is built from the checkout with
# the venv's setuptools (no build dependencies to fetch). Nothing is compiled on the device.
#
# What it does (idempotent: a second run changes nothing it need not, and never overwrites
# /etc/dongle/agent.toml or keys):
#   - system group and user `dongle` (no login, home /var/lib/dongle); groups dialout and gpio
#     exist (the unit's SupplementaryGroups= needs them)
#   - /opt/dongle/venv: a virtualenv holding the agent (`dongle-agent`, `dongle`) and the locked
#     dependencies;
#     /usr/local/bin/dongle links to the operator CLI
#   - /etc/dongle (root:dongle 0750), /etc/dongle/keys (dongle:dongle 0700), and
#     /etc/dongle/agent.toml (root:dongle 0640) from config/agent.example.toml if it is missing
#   - /var/lib/dongle (dongle:dongle 0750)
#   - /etc/systemd/system/dongle-agent.service, enabled but NOT started: start it once the device
#     is provisioned. If it is already running (an upgrade) it is restarted on the new code.
set -euo pipefail

SRC=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
PREFIX=/opt/dongle
VENV=$PREFIX/venv
ETC=/etc/dongle
STATE=/var/lib/dongle
UNIT_NAME=dongle-agent.service
UNIT_DST=/etc/systemd/system/$UNIT_NAME
USER_NAME=dongle

DRY=0
WHEEL=
WHEELHOUSE=

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "install: ERROR: $*" >&2; exit 1; }
say() { echo "install: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --wheel) [ $# -ge 2 ] || die "--wheel needs a file"; WHEEL=$(readlink -f "$2"); shift ;;
        --wheelhouse) [ $# -ge 2 ] || die "--wheelhouse needs a directory"; WHEELHOUSE=$(readlink -f "$2"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

# run CMD...: run it, or in dry-run mode only print it
run() {
    if [ "$DRY" = 1 ]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

# ensure_dir PATH OWNER:GROUP MODE
ensure_dir() {
    local path=$1 owner=$2 mode=$3
    if [ ! -d "$path" ]; then
        run install -d -o "${owner%%:*}" -g "${owner#*:}" -m "$mode" "$path"
    elif [ "$(stat -c '%U:%G %a' "$path")" != "$owner ${mode#0}" ]; then
        run chown "$owner" "$path"
        run chmod "$mode" "$path"
    fi
}

# --- checks (read-only) ---
[ "$(uname -s)" = Linux ] || die "this installs onto Linux (Raspberry Pi OS) only"
if [ "$DRY" = 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo $0 $*), or with --dry-run to see what it would do"
fi
[ -f "$SRC/setup.py" ] && [ -f "$SRC/requirements.lock" ] && [ -f "$SRC/systemd/$UNIT_NAME" ] \
    && [ -f "$SRC/config/agent.example.toml" ] \
    || die "$SRC is not a complete dongle-agent checkout (setup.py, requirements.lock, systemd/$UNIT_NAME, config/agent.example.toml)"
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || die "wheel not found: $WHEEL"
if [ -n "$WHEELHOUSE" ]; then
    [ -f "$WHEELHOUSE/requirements.txt" ] \
        || die "$WHEELHOUSE is not a wheelhouse (no requirements.txt): make one with make wheelhouse"
    # scripts/refcloud/wheelhouse.py names the architecture on the first line
    wh_arch=$(sed -n '1s/^# wheelhouse for \([a-z0-9_]*\),.*/\1/p' "$WHEELHOUSE/requirements.txt")
    [ "$wh_arch" = "$(uname -m)" ] \
        || die "$WHEELHOUSE is a wheelhouse for ${wh_arch:-an unknown architecture}, this machine is $(uname -m)"
fi
command -v python3 >/dev/null || die "python3 not found (Raspberry Pi OS ships it: is this the Lite image?)"
python3 - <<'PY' || die "Python >= 3.11 is needed (Raspberry Pi OS bookworm has 3.11)"
import sys
sys.exit(sys.version_info < (3, 11))
PY
[ "$DRY" = 1 ] && say "dry run: nothing will be changed"

# --- system packages ---
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    say "installing python3-venv"
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

# --- user and groups ---
for g in dialout gpio; do
    getent group "$g" >/dev/null || { say "creating group $g"; run groupadd --system "$g"; }
done
if ! getent group "$USER_NAME" >/dev/null; then
    say "creating group $USER_NAME"
    run groupadd --system "$USER_NAME"
fi
if ! getent passwd "$USER_NAME" >/dev/null; then
    say "creating user $USER_NAME"
    run useradd --system --gid "$USER_NAME" --home-dir "$STATE" --no-create-home \
        --shell /usr/sbin/nologin --comment "dongle agent" "$USER_NAME"
fi

# --- the agent in its virtualenv ---
ensure_dir "$PREFIX" root:root 0755
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    run python3 -m venv "$VENV"
fi
pip_args=(--quiet --disable-pip-version-check --no-cache-dir)
if [ -n "$WHEELHOUSE" ]; then
    pip_args+=(--no-index --find-links "$WHEELHOUSE")
    lock=$WHEELHOUSE/requirements.txt
else
    lock=$SRC/requirements.lock
fi
say "installing the locked dependencies into $VENV (from $lock)"
run "$VENV/bin/pip" install "${pip_args[@]}" --require-hashes -r "$lock"
say "installing the agent into $VENV (from ${WHEEL:-$SRC})"
# Not editable: the device runs a fixed copy; pip compiles the bytecode (/opt is read-only at run time).
# --no-deps: the dependencies are the lock's, installed above (pip check below proves they fit).
pip_args+=(--no-deps --no-build-isolation)
if [ -n "$WHEEL" ]; then
    run "$VENV/bin/pip" install "${pip_args[@]}" --upgrade "$WHEEL"
else
    # build from a copy: setuptools writes build/ and *.egg-info into the source tree, and
    # they would be root's files in the user's checkout
    if [ "$DRY" = 1 ]; then
        BUILD_SRC='$TMPDIR/src'
        echo "+ (copy of $SRC without .git, .venv, build)"
    else
        BUILD_SRC=$(mktemp -d)
        trap 'rm -rf "$BUILD_SRC"' EXIT
        tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
            --exclude=__pycache__ --exclude=./run -cf - . | tar -C "$BUILD_SRC" -xf -
    fi
    run "$VENV/bin/pip" install "${pip_args[@]}" --upgrade "$BUILD_SRC"
fi
run "$VENV/bin/pip" check --disable-pip-version-check \
    || die "the installed dependencies do not satisfy the agent's requirements ($VENV/bin/pip check)"
# `dongle` (the operator CLI) on everyone's PATH
if [ "$(readlink /usr/local/bin/dongle 2>/dev/null)" != "$VENV/bin/dongle" ]; then
    run ln -sfn "$VENV/bin/dongle" /usr/local/bin/dongle
fi
ensure_dir "$PREFIX/docs" root:root 0755
run install -m 0644 "$SRC/docs/install.md" "$PREFIX/docs/install.md"

# --- configuration and state ---
ensure_dir "$ETC" root:$USER_NAME 0750
ensure_dir "$ETC/keys" $USER_NAME:$USER_NAME 0700
if [ ! -e "$ETC/agent.toml" ]; then
    say "creating $ETC/agent.toml from config/agent.example.toml: edit it (device.id, mqtt.url, obd.port)"
    run install -o root -g "$USER_NAME" -m 0640 "$SRC/config/agent.example.toml" "$ETC/agent.toml"
else
    say "keeping existing $ETC/agent.toml"
fi
ensure_dir "$STATE" $USER_NAME:$USER_NAME 0750

# --- systemd unit: enabled, not started ---
if ! cmp -s "$SRC/systemd/$UNIT_NAME" "$UNIT_DST"; then
    say "installing $UNIT_DST"
    run install -m 0644 "$SRC/systemd/$UNIT_NAME" "$UNIT_DST"
fi
if [ -d /run/systemd/system ]; then   # systemd is running (not a chroot or image build)
    run systemctl daemon-reload
    # an upgrade of a running agent restarts it on the new code; otherwise it stays stopped
    run systemctl try-restart "$UNIT_NAME"
fi
if [ ! -e "/etc/systemd/system/multi-user.target.wants/$UNIT_NAME" ]; then
    run systemctl enable "$UNIT_NAME"
fi

# --- hints ---
cat <<EOF
install: done.
  Next (docs/install.md):
    1. provision:  sudo -u $USER_NAME dongle provision --device-id ID \\
                       --cloud-sign-pub cloud_sign.pub --cloud-enc-pub cloud_enc.pub --out $ETC/keys
    2. have $ETC/keys/tls.csr signed; put the certificate at $ETC/keys/tls.crt and the broker's CA
       at $ETC/keys/ca.pem (owner $USER_NAME, mode 0644)
    3. edit $ETC/agent.toml (device.id, mqtt.url, obd.port), then: sudo systemctl start dongle-agent
    4. check: journalctl -u dongle-agent -f    and    dongle status
  Serial adapter: name the ELM327 by its stable path in agent.toml [obd] port, not /dev/ttyUSB0:
EOF
if compgen -G "/dev/serial/by-id/*" >/dev/null; then
    for p in /dev/serial/by-id/*; do echo "    $p"; done
else
    echo "    (none plugged in now; plug it in and look in /dev/serial/by-id/)"
fi
echo "  Users who may run \`dongle status\`: sudo usermod -aG $USER_NAME USER (then log in again)"
