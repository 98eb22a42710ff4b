#!/usr/bin/env bash
# Builds the initramfs images in the build directory (busybox-static + stage-1 init + the kernel
# modules stage 1 needs), only when missing or older than initramfs-src/init or this script:
#   initramfs-uml.cpio  (Debian user-mode-linux: overlay; hostfs is built in)
#   initramfs-qemu.cpio (Debian linux-image-*-amd64: virtio-pci, 9p, overlay)
set -euo pipefail
SRC=$(dirname "$(readlink -f "$0")")
. "$SRC/common.sh"
build() { # out kroot mods...
  local out=$1 kroot=$2; shift 2
  if [ -f "$out" ] && [ "$out" -nt "$SRC/initramfs-src/init" ] && [ "$out" -nt "$0" ] \
     && [ "$out" -nt "$kroot/lib/modules" ]; then
    return 0
  fi
  local kver S
  kver=$(ls "$kroot/lib/modules" | head -1)
  S=$(mktemp -d)
  mkdir -p "$S/bin" "$S/mods"
  cp "$BUILD/x/bb/bin/busybox" "$S/bin/busybox"
  cp "$SRC/initramfs-src/init" "$S/init"
  chmod 755 "$S/init"
  : > "$S/mods/order"
  for m in "$@"; do
    modprobe -d "$kroot" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' | while read -r ko; do
    cp "$ko" "$S/mods/"; basename "$ko" >> "$S/mods/order"
  done
  (cd "$S" && find . | cpio -o -H newc --quiet) > "$out.tmp"
  mv "$out.tmp" "$out"
  rm -rf "$S"
  echo "built $out ($(stat -c %s "$out") bytes) for $kver"
}
[ -d "$BUILD/umlroot/lib/modules" ] && build "$BUILD/initramfs-uml.cpio" "$BUILD/umlroot" overlay
[ -d "$BUILD/kroot/boot" ] && build "$BUILD/initramfs-qemu.cpio" "$BUILD/kroot" virtio_pci 9pnet_virtio 9p overlay
exit 0
