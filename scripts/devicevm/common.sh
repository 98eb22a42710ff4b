# Sourced by the devicevm scripts.

# Unmount everything mounted at or below DIR (deepest first): a failed debootstrap can leave
# proc/sys/dev/pts mounted in its tree, and rm -rf must never walk into the host's /proc.
umount_under() {
  local dir m
  dir=$(readlink -m "$1")
  # /proc/self/mounts escapes spaces as \040; our paths have none
  for m in $(awk -v d="$dir" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m"
  done
}

# Let the kernel run foreign binaries (the arm64 chroot) through qemu-user-static.
enable_binfmt() {
  local q
  case $1 in arm64) q=qemu-aarch64 ;; *) echo "no binfmt handler known for $1" >&2; return 1 ;; esac
  [ -e /proc/sys/fs/binfmt_misc/register ] \
    || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || { echo "cannot mount binfmt_misc (is the binfmt_misc module there?)" >&2; return 1; }
  [ -e /proc/sys/fs/binfmt_misc/$q ] || update-binfmts --enable "$q"
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/$q \
    || { echo "binfmt handler $q is not enabled" >&2; return 1; }
}
