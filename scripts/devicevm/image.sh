#!/usr/bin/env bash
# Stage 2 of the device VM (called by build.sh, output goes to its log): a copy of the root tree
# configured for booting under QEMU, packed into a raw ext4 image by mke2fs -d (no loop mount),
# plus the kernel and initrd beside it. Runs no program of the guest's (no chroot): the same on
# both architectures and quick. Part of the image's cache key, with rootfs/.
#
# Usage: image.sh ARCH TREE_DIR ROOTFS_OVERLAY_DIR OUT_DIR
set -euo pipefail
ARCH=$1 TREE=$2 OVERLAY=$3 OUT=$4
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=common.sh
. "$HERE/common.sh"
SIZE=${DEVICEVM_IMAGE_SIZE:-3G}
STAGE=$OUT.stage
cleanup() { rm -rf --one-file-system "$STAGE"; }
trap cleanup EXIT
rm -rf --one-file-system "$STAGE" "$OUT"
mkdir -p "$STAGE" "$OUT"
cp -a --reflink=auto "$TREE/." "$STAGE/"

# Files of ours (rootfs/), owned by root whoever checked the source out; existing directories
# keep their owner and mode.
tar -C "$OVERLAY" --owner=0 --group=0 -cf - . | tar -C "$STAGE" --no-overwrite-dir -xf -

S=$STAGE/etc/systemd/system
unit_dir=/lib/systemd/system
mask() { for u in "$@"; do ln -sfn /dev/null "$S/$u"; done; }
enable() {  # enable UNIT TARGET: what `systemctl enable` does for a WantedBy=TARGET unit
  mkdir -p "$S/$2.wants"
  [ -e "$STAGE$unit_dir/$1" ] || { echo "image: no unit $1 in the tree" >&2; exit 1; }
  ln -sfn "$unit_dir/$1" "$S/$2.wants/$1"
}
# No getty on any serial line: serial-getty@ttyS0 hangs up the console when it starts, and the
# generator would put one on a virtio console (hvc*) too, fighting the test's own serial lines.
mask serial-getty@.service
# Timers that would reach for the network (there is none) or scrub the disk mid-test.
mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service
# Static network on QEMU's user-mode net (rootfs/etc/systemd/network/): no DHCP wait at boot.
enable systemd-networkd.service multi-user.target
enable systemd-networkd.socket sockets.target

sed -i 's/^root:[^:]*:/root::/' "$STAGE/etc/shadow"   # no password (there is no getty anyway)
# One machine id per image (an empty one makes every boot a "first boot").
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$STAGE/etc/machine-id"
echo >>"$STAGE/etc/machine-id"

kernels=("$STAGE"/boot/vmlinuz-*)
[ ${#kernels[@]} -eq 1 ] || { echo "image: expected one kernel in the tree, found ${kernels[*]}" >&2; exit 1; }
kver=${kernels[0]##*/vmlinuz-}
cp "$STAGE/boot/vmlinuz-$kver" "$OUT/vmlinuz"
cp "$STAGE/boot/initrd.img-$kver" "$OUT/initrd.img"
dpkg-query --admindir="$STAGE/var/lib/dpkg" -W -f '${Package} ${Version}\n' >"$OUT/packages.lst"

mke2fs -q -t ext4 -L devicevm-root -d "$STAGE" "$OUT/rootfs.img" "$SIZE"
chmod 0444 "$OUT/rootfs.img"   # the base of every test's overlay: never written
{ echo "arch=$ARCH"; echo "kernel=$kver"; echo "size=$SIZE"; echo "tree=$TREE"; } >"$OUT/info"
touch "$OUT/.complete"
echo "image: done ($kver, $(du -h "$OUT/rootfs.img" | cut -f1) used of $SIZE)"
