#!/usr/bin/env bash
# One-time setup for run-in-vm.sh: a User-Mode Linux kernel with SocketCAN (vcan, can_raw,
# can_bcm) and a tiny initramfs. Idempotent and quiet: a second run only checks (well under a
# second) and prints nothing. Needs root for apt-get (Debian 12 / bookworm packages).
#
# Everything it fetches or builds goes to the build directory, never into the source tree and
# never into the host's /boot or /lib/modules (kernel packages are only unpacked with dpkg-deb -x):
#   CANVM_DIR         build directory (default $XDG_CACHE_HOME/dongle-canvm, else /var/tmp/dongle-canvm)
#   CANVM_QEMU=1      also fetch qemu-system-x86 + Debian's linux-image-amd64 (VM_BACKEND=qemu)
set -euo pipefail
SRC=$(dirname "$(readlink -f "$0")")
# shellcheck source=common.sh
. "$SRC/common.sh"
mkdir -p "$BUILD" 2>/dev/null && [ -w "$BUILD" ] \
  || { echo "canvm setup FAILED: cannot create or write the build directory $BUILD (set CANVM_DIR)" >&2; exit 1; }
cd "$BUILD"
LOG=$BUILD/setup.log
: > "$LOG"
fail() {
  echo "canvm setup FAILED: $*" >&2
  echo "canvm setup: last lines of $LOG:" >&2
  tail -n 20 "$LOG" >&2
  echo "canvm setup: to start over: rm -rf $BUILD" >&2
  exit 1
}
trap 'fail "command failed at setup.sh line $LINENO"' ERR
export DEBIAN_FRONTEND=noninteractive
[ "$(uname -m)" = x86_64 ] || fail "only x86_64 hosts are supported (this is $(uname -m))"

# Host tools: kmod (depmod/modprobe to build the initramfs), cpio, iproute2 (ip inside the VM,
# which runs the host's userland), can-utils (cansend/candump/cangen inside the VM).
need=()
for t in depmod:kmod modprobe:kmod cpio:cpio ip:iproute2 cansend:can-utils cangen:can-utils dpkg-deb:dpkg; do
  command -v "${t%%:*}" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done
[ -n "${CANVM_QEMU:-}" ] && ! command -v qemu-system-x86_64 >/dev/null 2>&1 && need+=(qemu-system-x86)
mapfile -t need < <(printf '%s\n' "${need[@]}" | awk 'NF && !seen[$0]++')

PKGS="user-mode-linux busybox-static"
missing_debs=()
for p in $PKGS; do compgen -G "debs/${p}_*.deb" >/dev/null || missing_debs+=("$p"); done
KPKG=
if [ -n "${CANVM_QEMU:-}" ]; then
  [ -d kroot/boot ] || KPKG=needed
fi

if [ ${#need[@]} -gt 0 ] || [ ${#missing_debs[@]} -gt 0 ] || [ -n "$KPKG" ]; then
  [ "$(id -u)" -eq 0 ] || fail "first run needs root (apt-get install ${need[*]} / apt-get download ${missing_debs[*]})"
  echo "canvm setup: one-time download into $BUILD (a minute or two)..." >&2
  apt-get update -qq >>"$LOG" 2>&1 || fail "apt-get update failed (network?)"
  if [ ${#need[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$LOG" 2>&1 \
      || fail "apt-get install ${need[*]} failed"
  fi
  if [ -n "$KPKG" ]; then
    # the one concrete kernel linux-image-amd64 depends on (never a wildcard: that fetches dozens)
    KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$KPKG" ] || fail "cannot resolve linux-image-amd64 to a kernel package"
    compgen -G "debs/${KPKG}_*.deb" >/dev/null || missing_debs+=("$KPKG")
  fi
  mkdir -p debs
  for p in "${missing_debs[@]}"; do
    # apt-get download as root warns that the download is "unsandboxed"; harmless
    (cd debs && apt-get download -q "$p") >>"$LOG" 2>&1 || fail "apt-get download $p failed"
  done
fi

mkdir -p x
if [ ! -x x/bb/bin/busybox ]; then
  rm -rf x/bb
  dpkg-deb -x debs/busybox-static_*.deb x/bb 2>>"$LOG"
fi
if [ ! -x umlroot/linux.uml ]; then
  rm -rf x/uml umlroot
  dpkg-deb -x debs/user-mode-linux_*.deb x/uml 2>>"$LOG"
  mkdir -p umlroot/lib/modules
  mv x/uml/usr/lib/uml/modules/* umlroot/lib/modules/
  cp x/uml/usr/bin/linux.uml umlroot/linux.uml.tmp
  depmod -b "$BUILD/umlroot" "$(ls umlroot/lib/modules)" >>"$LOG" 2>&1
  mv umlroot/linux.uml.tmp umlroot/linux.uml   # last: marks the UML tree complete
  rm -rf x/uml
fi
if [ -n "${CANVM_QEMU:-}" ] && [ ! -d kroot/boot ]; then
  rm -rf x/k kroot
  dpkg-deb -x debs/"${KPKG}"_*.deb x/k 2>>"$LOG"
  grep -q '^CONFIG_CAN_VCAN=m' x/k/boot/config-* || fail "$KPKG lacks CONFIG_CAN_VCAN"
  mkdir -p kroot/lib
  mv x/k/lib/modules kroot/lib/
  depmod -b "$BUILD/kroot" "$(ls kroot/lib/modules)" >>"$LOG" 2>&1
  mv x/k/boot kroot/   # last: marks the kernel tree complete
  rm -rf x/k
fi
"$SRC/build-initramfs.sh" >>"$LOG" 2>&1 || fail "building the initramfs failed"
trap - ERR
