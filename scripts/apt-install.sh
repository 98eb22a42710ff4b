#!/usr/bin/env bash
# Installs Debian packages for set-up (scripts/setup.sh): apt-get install PKG..., with sudo when
# not root, waiting for the package manager when another process holds it.
#
#   scripts/apt-install.sh PKG...
#
# On a fresh Debian or Raspberry Pi OS, unattended-upgrades often holds the dpkg lock for
# minutes after boot; apt-get would fail at once ("Could not get lock /var/lib/dpkg/lock-frontend").
# This says who holds which lock, waits (up to SETUP_APT_LOCK_TIMEOUT seconds, default 1200),
# then goes on; apt-get itself gets -o DPkg::Lock::Timeout for what is left, should the lock be
# taken again in between. The package lists are updated only when a package has no
# installation candidate, or when an install fails (lists older than the mirror).
set -euo pipefail
[ $# -gt 0 ] || exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
timeout=${SETUP_APT_LOCK_TIMEOUT:-1200}
locks=(/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock)
start=$SECONDS
log=$(mktemp "${TMPDIR:-/tmp}/dongle-apt.XXXXXX.log")

# "LOCK PID NAME" of the first lock another process holds (apt and dpkg lock with fcntl), or nothing
holder() {
    $sudo python3 - "${locks[@]}" <<'PY'
import fcntl, os, struct, sys
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        continue
    try:
        got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    finally:
        os.close(fd)
    kind, _, _, _, pid = struct.unpack("hhqqi4x", got)
    if kind != fcntl.F_UNLCK:
        try:
            name = open(f"/proc/{pid}/comm").read().strip() or "?"
        except OSError:
            name = "?"
        print(path, pid, name)
        break
PY
}

left() {
    local n=$(( timeout - (SECONDS - start) ))
    echo $(( n > 1 ? n : 1 ))
}

wait_for_locks() {
    local told=0 next=0 h path pid name why
    while h=$(holder) && [ -n "$h" ]; do
        read -r path pid name <<<"$h"
        if [ $(( SECONDS - start )) -ge "$timeout" ]; then
            echo "setup: gave up after ${timeout} s waiting for $name (pid $pid), which holds $path;" \
                 "run set-up again once it has finished (SETUP_APT_LOCK_TIMEOUT sets how long to wait)" >&2
            return 1
        fi
        if [ "$told" -eq 0 ]; then
            why=""
            case $name in unattended-upgr*|apt.systemd.dai*|apt-get|apt|dpkg|packagekitd)
                why=" (the system's own package updates, common after a first boot)" ;; esac
            echo "setup: waiting for the package manager: $name (pid $pid) holds $path$why;" \
                 "waiting up to ${timeout} s (SETUP_APT_LOCK_TIMEOUT)"
            told=1
            next=$(( SECONDS + 30 ))
        elif [ "$SECONDS" -ge "$next" ]; then
            echo "setup: still waiting for $name (pid $pid): $(( SECONDS - start )) s"
            next=$(( SECONDS + 30 ))
        fi
        sleep 1
    done
    [ "$told" -eq 0 ] || echo "setup: the package manager is free after $(( SECONDS - start )) s; going on"
}

# apt-get ARGS...: after the locks are free; again if another process took a lock in between.
# Status 2: the locks stayed held (said already).
apt() {
    while :; do
        wait_for_locks || return 2
        if $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$(left)" "$@" >>"$log" 2>&1; then
            return 0
        fi
        [ -n "$(holder)" ] && [ $(( SECONDS - start )) -lt "$timeout" ] || return 1
    done
}

fail() {
    tail -n 20 "$log" >&2
    echo "setup: $*; full log in $log" >&2
    exit 1
}

echo "setup: installing system packages: $*"
unknown=()
for p in "$@"; do
    # (grep reads it all: with -q, apt-cache would die of SIGPIPE and pipefail say "unknown")
    apt-cache policy "$p" 2>/dev/null | grep 'Candidate: [^(]' >/dev/null || unknown+=("$p")
done
rc=0
if [ ${#unknown[@]} -gt 0 ]; then
    apt update -qq || rc=$?
    [ "$rc" -eq 0 ] || { [ "$rc" -eq 2 ] && { rm -f "$log"; exit 1; }; fail "apt-get update failed"; }
fi
apt install -y -qq "$@" || rc=$?
if [ "$rc" -eq 1 ]; then
    # the lists may be older than the mirror (a version no longer there): update, once more
    rc=0
    { apt update -qq && apt install -y -qq "$@"; } || rc=$?
fi
[ "$rc" -eq 0 ] || { [ "$rc" -eq 2 ] && { rm -f "$log"; exit 1; }; fail "apt-get install $* failed"; }
rm -f "$log"
