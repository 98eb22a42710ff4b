#!/usr/bin/env bash
# Builds (or finds in the cache) the device VM: a Debian 12 system with systemd as PID 1, for
# amd64 or arm64, as a raw ext4 image plus the kernel and initrd to boot it with. Prints the
# directory holding rootfs.img, vmlinuz and initrd.img on stdout; says nothing else unless it
# has to build. Idempotent; needs root (apt-get, debootstrap, chroot). See README.md.
#
# Usage: build.sh [--arch amd64|arm64] [--host-tools-only]
# Env:   DEVICEVM_DIR     cache directory (default /var/tmp/dongle-devicevm)
#        DEVICEVM_MIRROR  Debian mirror (default: the host's apt source, else deb.debian.org)
#
# Two cached stages, each keyed by a hash of its inputs and rebuilt when they change:
#   tree-ARCH-KEY/   debootstrap minbase + packages.txt (tree.sh)    amd64 ~2 min, arm64 long
#   image-ARCH-KEY/  the tree configured (image.sh, rootfs/) and packed by mke2fs -d: seconds
# Older entries of the same architecture are deleted, except images a DeviceVM still uses.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=common.sh
. "$HERE/common.sh"
ARCH=$(dpkg --print-architecture)
HOST_TOOLS_ONLY=
while [ $# -gt 0 ]; do
  case $1 in
    --arch) ARCH=$2; shift 2 ;;
    --arch=*) ARCH=${1#*=}; shift ;;
    --host-tools-only) HOST_TOOLS_ONLY=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "devicevm build: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $ARCH in
  amd64|x86_64) ARCH=amd64 ;;
  arm64|aarch64) ARCH=arm64 ;;
  *) echo "devicevm build: unsupported architecture $ARCH (amd64 or arm64)" >&2; exit 2 ;;
esac
SUITE=bookworm
DIR=${DEVICEVM_DIR:-/var/tmp/dongle-devicevm}
say() { echo "devicevm build: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, apt-get)"
mkdir -p "$DIR" 2>/dev/null && [ -w "$DIR" ] || die "cannot write the cache directory $DIR (set DEVICEVM_DIR)"
LOG=$DIR/build-$ARCH.log

# ---- host tools (apt-get install only what is missing) ----
need=()
for t in debootstrap:debootstrap qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils \
         mke2fs:e2fsprogs socat:socat; do
  command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done
if [ "$ARCH" = arm64 ]; then
  for t in qemu-system-aarch64:qemu-system-arm qemu-aarch64-static:qemu-user-static \
           update-binfmts:binfmt-support; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
  done
fi
if [ ${#need[@]} -gt 0 ]; then
  say "installing host packages: ${need[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$DIR/apt.log" 2>&1 \
    || { tail -n 20 "$DIR/apt.log" >&2; die "apt-get install ${need[*]} failed (log: $DIR/apt.log)"; }
fi
# mke2fs -d (populate from a directory) appeared in e2fsprogs 1.43
mke2fs -V 2>&1 | awk '/^mke2fs/ {split($2, v, "."); exit !(v[1] > 1 || v[2] >= 43)}' \
  || die "mke2fs is too old for -d (needs e2fsprogs >= 1.43)"
[ -n "$HOST_TOOLS_ONLY" ] && exit 0

# ---- mirror ----
MIRROR=${DEVICEVM_MIRROR:-}
if [ -z "$MIRROR" ]; then
  MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $2 !~ /^\[/ && $0 !~ /security/ {print $2; exit}' \
                                 /etc/apt/sources.list 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

# ---- cache keys ----
hash_files() { sha256sum "$@" | awk '{print $1}'; }
TREE_KEY=$( { echo "arch=$ARCH suite=$SUITE mirror=$MIRROR"
              hash_files "$HERE/tree.sh" "$HERE/common.sh" "$HERE/packages.txt"; } \
            | sha256sum | cut -c1-16)
TREE=$DIR/tree-$ARCH-$TREE_KEY
image_dir() {  # computed again after a long tree build, in case an input changed meanwhile
  IMAGE_KEY=$( { echo "tree=$TREE_KEY"
                 hash_files "$HERE/image.sh" "$HERE/common.sh"
                 (cd "$HERE/rootfs" && find . \( -type f -o -type l \) -printf '%p %m %l\n' | sort \
                    && find . -type f -print0 | sort -z | xargs -0 sha256sum); } \
               | sha256sum | cut -c1-16)
  echo "$DIR/image-$ARCH-$IMAGE_KEY"
}
# keep one tree and one image per architecture, and any image a DeviceVM still holds (its
# overlays stand on it: scripts/testbed/devicevm.py keeps a shared flock on .complete)
prune() {
  local old
  for old in "$DIR"/tree-"$ARCH"-* "$DIR"/image-"$ARCH"-*; do
    [ -e "$old" ] || continue
    case $old in "$TREE"|"$IMAGE") continue ;; esac
    if [ -e "$old/.complete" ] && ! flock -n -x "$old/.complete" true; then
      continue  # a VM still uses it: the next build deletes it
    fi
    umount_under "$old"
    rm -rf --one-file-system "$old"
  done
}
IMAGE=$(image_dir)
exec 9>"$DIR/.lock-$ARCH"
if [ -f "$IMAGE/.complete" ]; then
  if flock -n 9; then prune; fi   # (not while another build of this arch runs)
  echo "$IMAGE"
  exit 0
fi

# one build per architecture at a time; a second caller waits and then finds the result
if ! flock -n 9; then
  say "another build of the $ARCH image is running; waiting for it"
  flock 9
fi
if [ -f "$IMAGE/.complete" ]; then prune; echo "$IMAGE"; exit 0; fi

: >"$LOG"
step_fail() {
  say "last lines of $LOG:"
  tail -n 25 "$LOG" >&2
  die "$1 (full log: $LOG; to start over: rm -rf $DIR)"
}
if [ ! -d "$TREE" ]; then
  if [ "$ARCH" = arm64 ]; then est="about 8 minutes"; else est="about 2 minutes"; fi
  say "building the $ARCH root tree with debootstrap ($est; log: $LOG)"
  t0=$SECONDS
  "$HERE/tree.sh" "$ARCH" "$SUITE" "$MIRROR" "$HERE/packages.txt" "$TREE" >>"$LOG" 2>&1 \
    || step_fail "building the $ARCH root tree"
  say "$ARCH root tree built in $((SECONDS - t0)) s"
  echo "tree seconds: $((SECONDS - t0))" >>"$LOG"
  IMAGE=$(image_dir)
fi
t0=$SECONDS
"$HERE/image.sh" "$ARCH" "$TREE" "$HERE/rootfs" "$IMAGE" >>"$LOG" 2>&1 \
  || step_fail "building the $ARCH image"
say "$ARCH image built in $((SECONDS - t0)) s: $IMAGE"
echo "image seconds: $((SECONDS - t0))" >>"$LOG"
prune
echo "$IMAGE"
