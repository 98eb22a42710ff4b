#!/usr/bin/env bash
# Usage: run-in-vm.sh CMD [ARGS...]
# Boots a Debian 6.1 Linux kernel that has SocketCAN + vcan (User-Mode Linux by default), with the
# host's / visible read-only (tmpfs overlay on top: writes are discarded at exit), the current
# directory shared read-write, vcan0 created and up; runs CMD there as root with the caller's cwd
# and exported environment, streams its (combined stdout+stderr) output, and exits with CMD's exit
# code (125 if the VM itself failed). Runs setup.sh first (a no-op once set up).
# Env knobs:
#   VM_BACKEND=uml|qemu  uml (default): Debian user-mode-linux, no KVM needed, native-speed userspace.
#                        qemu: Debian linux-image-amd64 under QEMU (setup with CANVM_QEMU=1); TCG
#                        unless VM_ACCEL=kvm. When VM_BACKEND is not set and UML dies while
#                        booting (UML 6.1 panics at init on hosts whose CPUs have AMX: "ptrace
#                        set fp regs failed"), the command is run again under QEMU (~3x slower).
#   VM_VCAN="vcan0 vcan1"   interfaces to create (default vcan0)
#   VM_MODULES="..."        modules to load first (default: can can_raw can_bcm can_gw vcan)
#   VM_MEM=2G VM_SMP=2 (qemu only) VM_TIMEOUT=900 (seconds) VM_DEBUG=1 (kernel messages to stderr)
#   VM_RWDIR=<host dir shared read-write; default $PWD; empty = none>
#   CANVM_DIR=<build directory; see setup.sh>
set -u
SRC=$(dirname "$(readlink -f "$0")")
. "$SRC/common.sh"
[ $# -ge 1 ] || { echo "usage: $0 CMD [ARGS...]" >&2; exit 2; }
BACKEND=${VM_BACKEND:-uml}
case $BACKEND in
  uml)  KROOT=$BUILD/umlroot; INITRD=$BUILD/initramfs-uml.cpio ;;
  qemu) KROOT=$BUILD/kroot;   INITRD=$BUILD/initramfs-qemu.cpio; export CANVM_QEMU=1 ;;
  *) echo "run-in-vm: unknown VM_BACKEND=$BACKEND" >&2; exit 2 ;;
esac
"$SRC/setup.sh" || { echo "run-in-vm: setup failed, see above" >&2; exit 125; }
KVER=$(ls "$KROOT/lib/modules" | head -1)

CTL=$(mktemp -d "$BUILD/run.XXXXXX")
STARTED=$SECONDS
VMPID=
cleanup() {
  # if we are interrupted, do not leave the VM running until its timeout
  if [ -n "$VMPID" ] && kill -0 "$VMPID" 2>/dev/null; then
    kill -TERM "$VMPID" 2>/dev/null; sleep 1; kill -KILL "$VMPID" 2>/dev/null
    [ -n "${UMLPID:-}" ] && kill -KILL "$UMLPID" 2>/dev/null
  fi
  rm -rf "$CTL"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
RWDIR=${VM_RWDIR-$PWD}
{
  printf 'VM_MODDIR=%q\n' "$KROOT/lib/modules/$KVER"
  printf 'VM_RWDIR=%q\n' "$RWDIR"
  printf 'VM_VCAN=%q\n' "${VM_VCAN-vcan0}"
  printf 'VM_MODULES=%q\n' "${VM_MODULES-can can_raw can_bcm can_gw vcan}"
  if [ "$BACKEND" = qemu ]; then echo VM_DEBUGEXIT=1; else echo VM_DEBUGEXIT=0; fi
} > "$CTL/config"
cp "$SRC/stage2.sh" "$CTL/stage2.sh"
{
  export -p | grep -v -E '^declare -x (BASH_[A-Z_]*|SHLVL|OLDPWD|_|TMPDIR|XDG_RUNTIME_DIR|VM_[A-Z_]*|MAKE[A-Z_]*|MFLAGS)='
  printf 'cd %q || exit 126\n' "$PWD"
  printf '%q ' "$@"; echo
} > "$CTL/cmd.sh"

if [ "$BACKEND" = uml ]; then
  mkdir -p "$CTL/uml"   # UML's umid/mconsole dir (default would be ~/.uml)
  # CMD's output goes through the guest's /dev/ttyS0 (ssl0) to our stdout; kernel console to
  # stderr (VM_DEBUG) or nowhere
  if [ -n "${VM_DEBUG:-}" ]; then CON="con0=null,fd:2"; else CON="con0=null"; fi
  timeout -k 5 "${VM_TIMEOUT:-900}" \
    "$KROOT/linux.uml" mem="${VM_MEM:-2G}" uml_dir="$CTL/uml" initrd="$INITRD" rdinit=/init \
      canvm_fs=hostfs "canvm_ctl=$CTL" $CON con=null ssl=null ssl0=null,fd:1 ${VM_DEBUG:+loglevel=7} \
      </dev/null 2> >( if [ -n "${VM_DEBUG:-}" ]; then cat >&2; else cat >/dev/null; fi ) &
else
  if [ "${VM_ACCEL:-tcg}" = kvm ]; then ACCEL="-accel kvm -cpu host"; else ACCEL="-accel tcg,thread=multi -cpu max"; fi
  if [ -n "${VM_DEBUG:-}" ]; then LOG="console=ttyS0 loglevel=7"; else LOG="quiet"; fi
  RW_ARGS=()
  [ -n "$RWDIR" ] && RW_ARGS=(-fsdev "local,id=rw,path=$RWDIR,security_model=passthrough,multidevs=remap"
                              -device "virtio-9p-pci,fsdev=rw,mount_tag=rwdir")
  timeout -k 5 "${VM_TIMEOUT:-900}" \
  qemu-system-x86_64 $ACCEL -smp "${VM_SMP:-2}" -m "${VM_MEM:-2G}" \
    -nodefaults -no-user-config -display none -vga none -no-reboot \
    -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$INITRD" \
    -append "$LOG panic=-1 rdinit=/init canvm_fs=9p tsc=reliable no_timer_check 8250.nr_uarts=1 mitigations=off" \
    -fsdev "local,id=root,path=/,security_model=passthrough,readonly=on,multidevs=remap" \
    -device virtio-9p-pci,fsdev=root,mount_tag=hostroot \
    -fsdev "local,id=ctl,path=$CTL,security_model=passthrough" \
    -device virtio-9p-pci,fsdev=ctl,mount_tag=vmctl \
    "${RW_ARGS[@]}" </dev/null &
fi
VMPID=$!
wait "$VMPID"
VRC=$?
VMPID=
if [ -s "$CTL/rc" ]; then
  RC=$(cat "$CTL/rc")
else
  echo "run-in-vm: no exit code from the guest ($BACKEND rc=$VRC; 124 = timeout). Retry with VM_DEBUG=1." >&2
  RC=125
  # UML that died within seconds never ran CMD: a host it cannot boot on. Fall back to QEMU.
  if [ -z "${VM_BACKEND:-}" ] && [ "$VRC" != 124 ] && [ $((SECONDS - STARTED)) -lt 60 ]; then
    echo "run-in-vm: User-Mode Linux cannot boot on this host; running the command under QEMU instead" >&2
    rm -rf "$CTL"
    VM_BACKEND=qemu exec "$0" "$@"
  fi
fi
echo "run-in-vm: exit code $RC" >&2
exit "$RC"
