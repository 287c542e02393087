#!/bin/bash
# debian-guest.sh - build the Debian test guest of the appliance project: a Debian
# bookworm root file system (debootstrap, Debian packages only) with bash, fio,
# nvme-cli and the mkfs/fsck of ext4, xfs, btrfs and f2fs, booted with the busybox
# guest's kernel. Needs what images/qemu-env.sh built first (the kernel .deb and
# busybox under $QEMU_ENV/guest). Idempotent: finished parts are skipped.
# Run by `appliance image build --guest debian`; see images/README.md.
#
# Measured on the project machine (2 cores, no KVM, Dec 2026): see images/README.md
# ("The Debian guest") for the build time, the sizes and the boot time.
#
# It produces, under $QEMU_ENV/debian:
#   rootfs.img      ext4 image of the root file system (mke2fs -d, no loop mount);
#                   QEMU attaches it as a virtio-blk disk with snapshot=on, so every
#                   boot starts from the same bytes and guests may share the file
#   initrd.img      busybox + modules ($DEBIAN_MODULES and their deps) + an /init that
#                   loads them, mounts /dev/vda and switch_roots to /sbin/appliance-init
#   packages        the package list the root file system was made with
#   init-version    DEBIAN_INIT_VERSION below; the test harness checks it
#   rootfs.hash     hash of what went into rootfs.img (rebuilt when it differs)
#
# /sbin/appliance-init (kernel command line flags in parentheses) prints on ttyS0:
#   GUEST-UP uptime=S                      (from the initrd)
#   GUEST-DEBIAN CODENAME kernel=RELEASE   once the Debian root is mounted
#   (qe.shell)  GUEST-SHELL, then bash on ttyS0 with echo off, empty prompts and no
#               job control (no job notifications): the busybox guest's protocol
#               (appliance/testing/qemu.py Guest.run); when it exits: GUEST-SHELL-EXIT
#   GUEST-POWEROFF, then the guest powers off and QEMU exits
#
# Usage: sudo bash images/debian-guest.sh   (or: sudo appliance image build --guest debian)
#   env: QEMU_ENV, DEBIAN_MIRROR, DEBIAN_SUITE (bookworm), EXTRA_PACKAGES (more
#        packages, space-separated), DEBIAN_MODULES, FORCE=1 (debootstrap again)
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/guest-modules.sh"

# Bump DEBIAN_INIT_VERSION whenever an /init gains a behaviour tests rely on; the
# harness (appliance/testing/qemu.py, REQUIRED_DEBIAN_INIT_VERSION) refuses older ones.
DEBIAN_INIT_VERSION=3  # 2: no job notifications in the shell; 3: crc32 (f2fs)
BASE_PACKAGES="bash fio nvme-cli util-linux e2fsprogs xfsprogs btrfs-progs f2fs-tools procps iproute2 iputils-ping"
DEBIAN_MODULES=${DEBIAN_MODULES:-virtio_pci virtio_blk virtio_net nvme crc32c_generic crc32_generic ext4 xfs btrfs f2fs}

QE=${QEMU_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance/qemu-env}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${DEBIAN_SUITE:-bookworm}
G=$QE/guest
D=$QE/debian
T0=$SECONDS
say() { printf '[debian-guest %3ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { say "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
[ -e "$G/.guest-ok" ] && [ -x "$G/busybox" ] || die "$G is not built: run images/qemu-env.sh first"
mkdir -p "$D"
exec 9>"$D/.lock"
flock -w 900 9 || die "another debian-guest.sh holds $D/.lock"
for t in debootstrap mke2fs chroot dpkg-deb xz gzip sha256sum; do
    command -v $t >/dev/null || die "missing $t"
done
read -r KPKG KV < "$G/kernel-version"
KDEB=$(ls "$G/debs/${KPKG}"_*.deb 2>/dev/null | tail -1) || die "no $KPKG .deb in $G/debs"

# ---------------------------------------------------------------- 1. root file system
# One debootstrap per package list (a changed EXTRA_PACKAGES makes a new one).
PACKAGES=$(echo $BASE_PACKAGES ${EXTRA_PACKAGES:-} | tr ' ' '\n' | sort -u | paste -sd' ')
[ -z "${FORCE:-}" ] || rm -f "$D/root/.debian-ok"
if [ ! -e "$D/root/.debian-ok" ] || [ "$(cat "$D/packages" 2>/dev/null)" != "$SUITE $PACKAGES" ]; then
    grep -q " $D/root[/ ]" /proc/mounts && die "something is mounted under $D/root"
    rm -rf "$D/root"
    say "debootstrap $SUITE (minbase + $PACKAGES) ..."
    debootstrap --variant=minbase --include="${PACKAGES// /,}" "$SUITE" "$D/root" "$MIRROR" \
        > "$D/debootstrap.log" 2>&1 || { tail -5 "$D/debootstrap.log"; die "debootstrap failed (log: $D/debootstrap.log)"; }
    chroot "$D/root" apt-get clean
    # what a guest never reads: documentation, translations, apt's lists
    rm -rf "$D/root"/usr/share/{doc,man,info,locale}/* "$D/root"/var/lib/apt/lists/* \
           "$D/root"/var/cache/apt/* "$D/root"/var/log/*
    echo "$SUITE $PACKAGES" > "$D/packages"
    touch "$D/root/.debian-ok"
fi

# ---------------------------------------------------------------- 2. modules
want_list="$KV $DEBIAN_MODULES"
if [ "$(cat "$D/modules/.list" 2>/dev/null)" != "$want_list" ]; then
    say "collecting modules: $DEBIAN_MODULES ..."
    collect_modules "$KDEB" "$KV" "$DEBIAN_MODULES" "$D/modules.new"
    echo "$want_list" > "$D/modules.new/.list"
    rm -rf "$D/modules"
    mv "$D/modules.new" "$D/modules"
fi

# ---------------------------------------------------------------- 3. /sbin/appliance-init
cat > "$D/appliance-init.new" <<'INIT'
#!/bin/bash
# Appliance Debian test guest init (DEBIAN_INIT_VERSION in images/debian-guest.sh):
# PID 1 after the initrd's switch_root. Prints markers on ttyS0.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LC_ALL=C.UTF-8
mount -t proc proc /proc; mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=1777 tmpfs /tmp; mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
hostname debian-guest
. /etc/os-release
echo "GUEST-DEBIAN $VERSION_CODENAME kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
if grep -qw qe.shell /proc/cmdline; then
  # Commands arrive on ttyS0 from QEMU's stdin. Echo off, no line editing,
  # empty prompts and no job control (no "[1]+ Done" lines after a background
  # job), so the console shows only what the commands print.
  stty -echo < /dev/ttyS0
  echo "GUEST-SHELL"
  PS1= PS2= PROMPT_COMMAND='set +m' setsid -c -w bash --noediting --noprofile --norc -i \
    <>/dev/ttyS0 >&0 2>&1
  echo "GUEST-SHELL-EXIT"
fi
echo "GUEST-POWEROFF"
sync
echo o > /proc/sysrq-trigger
while :; do :; done  # until the power is off; PID 1 must not exit
INIT

cat > "$D/init.new" <<'INIT'
#!/bin/busybox sh
# Appliance Debian test guest initrd: load the modules, mount the Debian root
# (/dev/vda, ext4) and hand over to its /sbin/appliance-init.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo; echo "GUEST-UP uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "GUEST-INSMOD-FAIL $m"; done
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
if ! mount -t ext4 /dev/vda /newroot; then
  echo "GUEST-ROOT-FAIL no Debian root on /dev/vda"; poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/appliance-init
INIT

# ---------------------------------------------------------------- 4. rootfs.img
want_hash=$( { echo "init-version $DEBIAN_INIT_VERSION"; cat "$D/packages" "$D/appliance-init.new"; } \
             | sha256sum | cut -d' ' -f1)
if [ ! -s "$D/rootfs.img" ] || [ "$(cat "$D/rootfs.hash" 2>/dev/null)" != "$want_hash" ]; then
    install -m 755 "$D/appliance-init.new" "$D/root/sbin/appliance-init"
    used_mb=$(( $(du -sm "$D/root" | cut -f1) ))
    size_mb=$(( used_mb + used_mb / 4 + 64 ))   # room for what a test writes to /root or /var
    say "making rootfs.img (${used_mb} MiB used, ${size_mb} MiB image) ..."
    rm -f "$D/rootfs.img.new"
    mke2fs -q -t ext4 -L debian-root -d "$D/root" "$D/rootfs.img.new" "${size_mb}M" \
        || die "mke2fs -d failed"
    mv "$D/rootfs.img.new" "$D/rootfs.img"
    echo "$want_hash" > "$D/rootfs.hash"
fi

# ---------------------------------------------------------------- 5. initrd.img
want_ihash=$( { echo "init-version $DEBIAN_INIT_VERSION"; cat "$D/init.new" "$D/modules/.list"
                sha256sum < "$G/busybox"; } | sha256sum | cut -d' ' -f1)
if [ ! -s "$D/initrd.img" ] || [ "$(cat "$D/initrd.hash" 2>/dev/null)" != "$want_ihash" ]; then
    say "building initrd ..."
    R=$D/initrd.d
    rm -rf "$R"
    mkdir -p "$R"/{bin,dev,proc,sys,newroot,modules}
    cp "$G/busybox" "$R/bin/busybox"
    mknod -m 600 "$R/dev/console" c 5 1
    cp "$D/modules/"*.ko "$R/modules/"
    cp "$D/modules/modules.order" "$R/modules.order"
    install -m 755 "$D/init.new" "$R/init"
    (cd "$R" && find . | "$G/busybox" cpio -o -H newc 2>/dev/null | gzip -6 > "$D/initrd.img.new")
    mv "$D/initrd.img.new" "$D/initrd.img"
    echo "$want_ihash" > "$D/initrd.hash"
    rm -rf "$R"
fi
echo "$DEBIAN_INIT_VERSION" > "$D/init-version"
rm -f "$D/init.new" "$D/appliance-init.new"
say "done: $D/rootfs.img $(du -m "$D/rootfs.img" | cut -f1) MiB ($(cat "$D/packages")), initrd $(du -k "$D/initrd.img" | cut -f1) KiB, kernel $KV"
