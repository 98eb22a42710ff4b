#!/usr/bin/env bash
# Stage 1 of the device VM (called by build.sh, output goes to its log): a Debian minbase root
# tree with systemd, by debootstrap in two stages. The second stage runs in a chroot: natively for
# amd64, under qemu-user-static (binfmt_misc) for arm64, which is the slow part (dpkg and
# mkinitramfs emulated). Everything in this file is part of the tree's cache key: edit with care.
#
# Usage: tree.sh ARCH SUITE MIRROR PACKAGES_FILE OUT_DIR
set -euo pipefail
ARCH=$1 SUITE=$2 MIRROR=$3 PKGFILE=$4 OUT=$5
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=common.sh
. "$HERE/common.sh"

pkgs=$(grep -v -E '^\s*(#|$)' "$PKGFILE" | tr -s ' \n' ',' | sed 's/,$//')
pkgs="$pkgs,linux-image-$ARCH"
TMP=$OUT.tmp
umount_under "$TMP"
rm -rf --one-file-system "$TMP"

echo "tree: debootstrap first stage ($ARCH, $SUITE, $MIRROR)"
debootstrap --arch="$ARCH" --variant=minbase --foreign --include="$pkgs" "$SUITE" "$TMP" "$MIRROR"

# A small initramfs: only the modules that mount a virtio-blk ext4 root (the default,
# MODULES=most, copies every storage driver and takes ~7 minutes a run under emulation).
# conf.d/ and hooks/ are not dpkg conffiles, so they can be laid before the packages unpack.
mkdir -p "$TMP/etc/initramfs-tools/conf.d" "$TMP/etc/initramfs-tools/hooks"
echo 'MODULES=list' > "$TMP/etc/initramfs-tools/conf.d/devicevm.conf"
cat > "$TMP/etc/initramfs-tools/hooks/devicevm" <<'HOOK'
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
force_load virtio_pci
force_load virtio_mmio
force_load virtio_blk
force_load ext4
HOOK
chmod 755 "$TMP/etc/initramfs-tools/hooks/devicevm"

echo "tree: debootstrap second stage"
if [ "$ARCH" != "$(dpkg --print-architecture)" ]; then
  enable_binfmt "$ARCH"
fi
# the chroot must not inherit the caller's locale or temp dir
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
  chroot "$TMP" /debootstrap/debootstrap --second-stage
umount_under "$TMP"

ls "$TMP"/boot/vmlinuz-* "$TMP"/boot/initrd.img-* >/dev/null \
  || { echo "tree: no kernel or initrd in $TMP/boot" >&2; exit 1; }
rm -rf "$TMP"/var/cache/apt/archives/*.deb
mv "$TMP" "$OUT"
echo "tree: done ($(du -sh --one-file-system "$OUT" | cut -f1))"
