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
#   - /opt/dongle/slots/VERSION: a virtualenv holding the agent (`dongle-agent`, `dongle`,
#     `dongle-update`) and the locked dependencies, VERSION being the agent's (setup.py, or the
#     wheel's); /opt/dongle/current -> slots/VERSION (the one before becomes `previous`),
#     /opt/dongle/venv -> current; /usr/local/bin/dongle links to the operator CLI. All of
#     /opt/dongle is root's: the agent (user dongle) can read its code, never change it; OTA
#     updates are installed by dongle-update-install.service (docs/updates.md)
#   - /etc/dongle (root:dongle 0750), /etc/dongle/keys (dongle:dongle 0700), and
#     /etc/dongle/agent.toml (root:dongle 0640) from config/agent.example.toml if it is missing
#   - /var/lib/dongle (dongle:dongle 0750) and /var/lib/dongle/update (the agent's update
#     staging area and its requests to the installer)
#   - in /etc/systemd/system: dongle-agent.service with its update drop-in
#     (dongle-agent.service.d/update.conf), dongle-agent-rollback.service,
#     dongle-update-install.service and dongle-update-install.path. The agent is enabled but NOT
#     started: start it once the device is provisioned. If it is already running (an upgrade) it
#     is restarted on the new code. The path unit is enabled and started.
set -euo pipefail

SRC=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
PREFIX=/opt/dongle
VENV=$PREFIX/venv
ETC=/etc/dongle
STATE=/var/lib/dongle
UNIT_NAME=dongle-agent.service
UNIT_DIR=/etc/systemd/system
USER_NAME=dongle
# systemd/ FILE -> /etc/systemd/system/FILE: the agent, its update drop-in, the rollback unit,
# the installer and its trigger.
UNITS=(dongle-agent.service dongle-agent.service.d/update.conf dongle-agent-rollback.service
       dongle-update-install.service dongle-update-install.path)

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
[ -f "$SRC/setup.py" ] && [ -f "$SRC/requirements.lock" ] && [ -f "$SRC/config/agent.example.toml" ] \
    || die "$SRC is not a complete dongle-agent checkout (setup.py, requirements.lock, config/agent.example.toml)"
for u in "${UNITS[@]}"; do
    [ -f "$SRC/systemd/$u" ] || die "$SRC is not a complete dongle-agent checkout (systemd/$u)"
done
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || die "wheel not found: $WHEEL"
# The slot is named by the agent's version: a plain version, as agent/update/slots.py says.
if [ -n "$WHEEL" ]; then
    VERSION=$(basename "$WHEEL" | sed -n 's/^dongle_agent-\([^-]*\)-.*\.whl$/\1/p')
else
    VERSION=$(sed -n 's/^ *version="\([^"]*\)",.*$/\1/p' "$SRC/setup.py" | head -n 1)
fi
[[ "$VERSION" =~ ^[0-9A-Za-z]+([.+_-][0-9A-Za-z]+)*$ ]] && [ ${#VERSION} -le 64 ] \
    && [[ "$VERSION" != *.partial ]] || die "cannot tell the agent's version (got '${VERSION}')"
SLOT=$PREFIX/slots/$VERSION
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

# --- the agent in its slot (a virtualenv) ---
ensure_dir "$PREFIX" root:root 0755
ensure_dir "$PREFIX/slots" root:root 0755
ensure_dir "$PREFIX/update" root:root 0755
if [ -d "$SLOT" ] && [ ! -x "$SLOT/bin/pip" ]; then
    # an OTA bundle (agent/update) installed this version: its files are verified, keep them
    say "keeping $SLOT (installed by an update)"
else
    if [ ! -x "$SLOT/bin/python" ]; then
        say "creating $SLOT"
        run python3 -m venv "$SLOT"
    fi
    pip_args=(--quiet --disable-pip-version-check --no-cache-dir)
    if [ -n "$WHEELHOUSE" ]; then
        pip_args+=(--no-index --find-links "$WHEELHOUSE")
        lock=$WHEELHOUSE/requirements.txt
    else
        lock=$SRC/requirements.lock
    fi
    say "installing the locked dependencies into $SLOT (from $lock)"
    run "$SLOT/bin/pip" install "${pip_args[@]}" --require-hashes -r "$lock"
    say "installing the agent $VERSION into $SLOT (from ${WHEEL:-$SRC})"
    # Not editable: the device runs a fixed copy; pip compiles the bytecode (/opt is read-only at run time).
    # --no-deps: the dependencies are the lock's, installed above (pip check below proves they fit).
    pip_args+=(--no-deps --no-build-isolation)
    if [ -n "$WHEEL" ]; then
        run "$SLOT/bin/pip" install "${pip_args[@]}" --upgrade "$WHEEL"
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
        run "$SLOT/bin/pip" install "${pip_args[@]}" --upgrade "$BUILD_SRC"
    fi
    run "$SLOT/bin/pip" check --disable-pip-version-check \
        || die "the installed dependencies do not satisfy the agent's requirements ($SLOT/bin/pip check)"
    [ "$DRY" = 1 ] || sync -f "$SLOT"
fi

# set_link LINK TARGET: point LINK at TARGET atomically (a new link renamed over the old one)
set_link() {
    [ "$(readlink "$1" 2>/dev/null)" = "$2" ] && return 0
    run ln -sfn "$2" "$1.new"
    run mv -Tf "$1.new" "$1"
}
current=$(readlink "$PREFIX/current" 2>/dev/null || true)
if [ "$current" != "slots/$VERSION" ]; then
    if [ -n "$current" ]; then
        say "making $VERSION current (previous: ${current#slots/})"
        set_link "$PREFIX/previous" "$current"
    fi
    set_link "$PREFIX/current" "slots/$VERSION"
fi
# the first installs made /opt/dongle/venv a directory: it is a link to current now
if [ -d "$VENV" ] && [ ! -L "$VENV" ]; then
    say "replacing the old $VENV directory by a link to current"
    run rm -rf "$VENV"
fi
set_link "$VENV" current
# `dongle` (the operator CLI) on everyone's PATH, through the links: it follows updates
if [ "$(readlink /usr/local/bin/dongle 2>/dev/null)" != "$VENV/bin/dongle" ]; then
    run ln -sfn "$VENV/bin/dongle" /usr/local/bin/dongle
fi
ensure_dir "$PREFIX/docs" root:root 0755
for doc in install.md updates.md; do
    cmp -s "$SRC/docs/$doc" "$PREFIX/docs/$doc" || run install -m 0644 "$SRC/docs/$doc" "$PREFIX/docs/$doc"
done

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
ensure_dir "$STATE/update" $USER_NAME:$USER_NAME 0750

# --- systemd units: the agent enabled, not started; the installer's trigger enabled and started ---
ensure_dir "$UNIT_DIR/$UNIT_NAME.d" root:root 0755
for u in "${UNITS[@]}"; do
    if ! cmp -s "$SRC/systemd/$u" "$UNIT_DIR/$u"; then
        say "installing $UNIT_DIR/$u"
        run install -m 0644 "$SRC/systemd/$u" "$UNIT_DIR/$u"
    fi
done
if [ -d /run/systemd/system ]; then   # systemd is running (not a chroot or image build)
    run systemctl daemon-reload
    # an upgrade of a running agent restarts it on the new code; otherwise it stays stopped
    run systemctl try-restart "$UNIT_NAME"
fi
for u in "$UNIT_NAME" dongle-update-install.path; do
    if [ ! -e "$UNIT_DIR/multi-user.target.wants/$u" ]; then
        run systemctl enable "$u"
    fi
done
if [ -d /run/systemd/system ] && ! systemctl -q is-active dongle-update-install.path; then
    run systemctl start dongle-update-install.path
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
