#!/bin/bash
# qemu-env.sh - provision the QEMU test environment of the appliance project:
# a Debian-sid chroot holding QEMU 11.1 (which has the vfio-user-pci *client*)
# and a tiny busybox test guest for it. Debian packages only. Idempotent: finished
# parts are skipped; a changed guest /init or module list rebuilds only the initrd.
# Called by scripts/provision (with SKIP_BOOT_TEST=1); see images/README.md.
#
# Measured on the project machine (2 cores, bookworm host, no KVM used, Nov 2026):
#   fresh run: 64-107 s wall (debootstrap of sid 50 s). Downloads about 150 MB:
#              68 MB of sid .debs (127 packages), about 11 MB sid index, the 70.6 MB
#              bookworm kernel .deb, 0.9 MB busybox-static. Disk afterwards: about
#              470 MB (chroot 360 MB after apt-get clean, guest/ 113 MB).
#   re-run:    about 1 s with SKIP_BOOT_TEST=1 (plus about 8 s for the boot test);
#              an initrd rebuild adds about 1 s, a module-list change about 10 s
#              (the kernel .deb is kept and unpacked again). Downloads nothing.
#   guest boot under TCG, QEMU start -> GUEST-UP: 3.6-4.3 s with vmlinux (PVH).
#
# It produces, under $QEMU_ENV (default ~/.cache/appliance/qemu-env):
#   qemu-source               "sid", or "host PATH" when the host's QEMU is used (no sid/)
#   sid/                      sid chroot, minbase + qemu-system-x86 + qemu-utils + nvme-cli
#   bin/sid-run CMD...        run CMD in the chroot, in a private mount namespace
#                             with the host's /dev /proc /sys /tmp /run /root /home,
#                             the top-level folder of the caller's cwd, the top-level
#                             folder holding $QEMU_ENV and the folders listed in
#                             $SID_RUN_BIND (colon-separated) bound in. The cwd is
#                             kept, and so is the PID (exec all the way).
#   bin/qemu-system-x86_64    run sid's QEMU this way (same for bin/qemu-img)
#   bin/guest-boot [ARGS...]  boot the test guest under TCG with memfd shared memory,
#                             then add ARGS. GUEST_APPEND adds to the kernel command line.
#   guest/vmlinux             uncompressed kernel (PVH boot), faster under TCG than...
#   guest/vmlinuz             ...the bzImage, which has to decompress xz under TCG
#   guest/initrd.img          busybox + modules ($GUEST_MODULES and deps) + nvme-cli + /init
#   guest/init-version        INIT_VERSION below; the test harness checks it
#   guest/initrd.hash         hash of what went into initrd.img (rebuilt when it differs)
#
# The guest's /init (kernel command line flags in parentheses):
#   GUEST-UP uptime=S         first marker (preceded by an empty line: `quiet` can glue
#                             text to firmware output; match markers anywhere in a line)
#   GUEST-INSMOD-FAIL M       a module failed to load;  then GUEST-MODULES-LOADED
#   GUEST-PCI-BEGIN / -END    around one line per PCI function:
#     PCI BDF vendor=0x.. device=0x.. class=0x.. driver=NAME|- [barN=0xSTART+0xSIZE:TYPE]...
#       TYPE = io|mem|mem64 with -pref (prefetchable) / -unset (not assigned) suffixes
#     PCICAPS BDF ID ID ...   capability ids (hex) in chain order, from config space
#   GUEST-NET IFACES / GUEST-BLOCK DISKS
#   (qe.nvmetest)             GUEST-NVME-PRESENT sectors=N model=M, then GUEST-NVME-RW-OK
#                             or -MISMATCH (4 KiB write/read at LBA 8); or GUEST-NVME-ABSENT
#   (qe.shell)                GUEST-SHELL, then an interactive busybox sh on ttyS0 with
#                             echo off and an empty prompt (commands come from QEMU's
#                             stdin); when it exits: GUEST-SHELL-EXIT
#   (qe.hold)                 GUEST-HOLDING, then it never powers off
#   GUEST-POWEROFF            last line; the guest powers off and QEMU exits
#
# Note: sid's QEMU is built WITHOUT the vfio-user server (x-vfio-user-server:
# "invalid object type"); only the client device vfio-user-pci is there.
#
# Usage: sudo bash images/qemu-env.sh   (or: sudo appliance image build)
#   env: QEMU_ENV, DEBIAN_MIRROR, SKIP_BOOT_TEST=1, KERNEL_PKG, GUEST_MODULES,
#        FORCE=1 (rebuild everything: new debootstrap, new downloads),
#        QEMU_SOURCE=auto|host|sid (auto: the host's QEMU if it is 10.1+ with
#        vfio-user-pci, then no chroot is made; else sid's; see "which QEMU")
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/guest-modules.sh"

# Bump INIT_VERSION whenever /init gains a behaviour tests rely on; the harness
# (tests/integration/qemu.py, REQUIRED_INIT_VERSION) refuses older guests.
INIT_VERSION=3  # 3: nvme-cli in the guest
GUEST_MODULES=${GUEST_MODULES:-virtio_pci virtio_net nvme crc32c_generic ext4}

QE=${QEMU_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance/qemu-env}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SID=$QE/sid
G=$QE/guest
T0=$SECONDS
say() { printf '[qemu-env %3ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { say "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
mkdir -p "$QE/bin" "$G/debs"
# One run at a time per environment (scripts/provision may race a manual run).
exec 9>"$QE/.lock"
flock -w 900 9 || die "another qemu-env.sh holds $QE/.lock"
if [ -n "${FORCE:-}" ]; then
    say "FORCE: rebuilding everything"
    rm -f "$SID/.qemu-env-ok" "$G/.guest-ok" "$G/busybox" "$G/modules/.list" "$G/initrd.hash" \
          "$G/debs/"*.deb
fi
# Install stdin as executable $1, atomically and only when it changed: a QEMU being
# started by a test at the same moment never sees a half-written wrapper.
install_exe() {
    cat > "$1.new" && chmod +x "$1.new"
    if cmp -s "$1.new" "$1"; then rm -f "$1.new"; else mv "$1.new" "$1"; fi
}
install_file() {  # the same for a plain file
    cat > "$1.new"
    if cmp -s "$1.new" "$1"; then rm -f "$1.new"; else mv "$1.new" "$1"; fi
}

# ---------------------------------------------------------------- host tools
# apt on the host stays bookworm-only. Another process may hold the dpkg lock:
# wait for it (Lock::Timeout) and retry.
apt_host() {
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do
        apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3 "$@" && return 0
        say "apt-get $* failed (try $i), retrying in 15 s"; sleep 15
    done
    return 1
}
# ---------------------------------------------------------------- which QEMU
# QEMU_SOURCE=auto (default): the host's qemu-system-x86_64 when it is 10.1 or newer
# and has the vfio-user-pci client (QEMU 10.1 added it), else sid's in a chroot.
# QEMU_SOURCE=host or =sid forces one. $QE/bin is never taken for the host's.
host_qemu() {
    local exe v
    exe=$(PATH=$(printf %s "$PATH" | tr : '\n' | grep -vxF "$QE/bin" | paste -sd:) \
          command -v qemu-system-x86_64) || return 1
    v=$("$exe" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -1)
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt 10 ] || { [ "$1" -eq 10 ] && [ "$2" -ge 1 ]; } || return 1
    case $("$exe" -device help 2>/dev/null) in *'"vfio-user-pci"'*) echo "$exe" ;; *) return 1 ;; esac
}
case ${QEMU_SOURCE:-auto} in
    auto) if HQ=$(host_qemu); then SOURCE=host; else SOURCE=sid; fi ;;
    host) HQ=$(host_qemu) || die "QEMU_SOURCE=host: no qemu-system-x86_64 10.1+ with vfio-user-pci in PATH"
          SOURCE=host ;;
    sid) SOURCE=sid ;;
    *) die "QEMU_SOURCE must be auto, host or sid, not '$QEMU_SOURCE'" ;;
esac

if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    apt_host update -q
fi
if [ "$SOURCE" = sid ] && ! command -v debootstrap >/dev/null; then
    apt_host install -y -q --no-install-recommends debootstrap
fi
command -v xz >/dev/null || apt_host install -y -q --no-install-recommends xz-utils
for t in xz gzip grep find unshare chroot dpkg-deb tar sha256sum flock ldd; do
    command -v $t >/dev/null || die "missing $t"
done

# ---------------------------------------------------------------- 1. QEMU
if [ "$SOURCE" = host ]; then
    HQIMG=$(dirname "$HQ")/qemu-img
    [ -x "$HQIMG" ] || HQIMG=$(command -v qemu-img) || die "the host's QEMU has no qemu-img"
    say "host QEMU: $("$HQ" --version | head -1) ($HQ)"
    printf '#!/bin/sh\nexec %s "$@"\n' "$HQ" | install_exe "$QE/bin/qemu-system-x86_64"
    printf '#!/bin/sh\nexec %s "$@"\n' "$HQIMG" | install_exe "$QE/bin/qemu-img"
    echo "host $HQ" | install_file "$QE/qemu-source"
    # nvme-cli for the guest comes from the host (step 6).
    command -v nvme >/dev/null || apt_host install -y -q --no-install-recommends nvme-cli
    NVME_ROOT=
fi
if [ "$SOURCE" = sid ]; then
if [ ! -e "$SID/.qemu-env-ok" ]; then
    if grep -q " $SID[/ ]" /proc/mounts; then
        die "something is mounted under $SID; unmount it first (see /proc/mounts)"
    fi
    rm -rf "$SID"
    say "debootstrap sid (minbase + qemu-system-x86 qemu-utils) ..."
    # The mirror serves a frozen sid snapshot whose Release may be past Valid-Until:
    # debootstrap does not check that; apt inside the chroot needs
    # -o Acquire::Check-Valid-Until=false.
    debootstrap --variant=minbase --include=qemu-system-x86,qemu-utils \
        sid "$SID" "$MIRROR"
    chroot "$SID" apt-get clean
    echo 'Acquire::Check-Valid-Until "false";' > "$SID/etc/apt/apt.conf.d/99no-valid-until"
    touch "$SID/.qemu-env-ok"
fi
say "sid: $(chroot "$SID" qemu-system-x86_64 --version | head -1)"
# nvme-cli for the guest (copied into the initrd with its libraries, step 6): the
# driver tests' view of the controller (id-ctrl, smart-log, error-log, passthrough).
if [ ! -x "$SID/usr/sbin/nvme" ]; then
    say "installing nvme-cli in the chroot (for the guest) ..."
    chroot "$SID" apt-get -o Acquire::Retries=3 update -q >/dev/null
    chroot "$SID" apt-get -o Acquire::Retries=3 install -y -q --no-install-recommends nvme-cli >/dev/null
    chroot "$SID" apt-get clean
fi
[ -x "$SID/usr/sbin/nvme" ] || die "nvme-cli missing in the chroot"
NVME_ROOT=$SID
echo sid | install_file "$QE/qemu-source"

# ---------------------------------------------------------------- wrappers
install_exe "$QE/bin/sid-run" <<'EOF'
#!/bin/bash
# Run a program from the sid chroot, e.g.: sid-run qemu-system-x86_64 -version
# A private mount namespace: the bind mounts go away when the program exits.
# /dev /proc /sys /tmp /run /root /home, the top folder of the cwd, the top folder
# holding this environment and the folders in $SID_RUN_BIND (colon-separated) are
# the host's, so socket and file paths mean the same inside and out; the cwd (if it
# exists in the chroot) and the PID are kept.
QE=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
exec unshare --mount --propagation private -- /bin/bash -c '
QE=$1; S=$1/sid; shift
mount --rbind /dev "$S/dev" && mount -t proc proc "$S/proc" && mount --rbind /sys "$S/sys" &&
mount --bind /tmp "$S/tmp" && mount --bind /run "$S/run" || exit 125
top() { echo "/$(echo "${1#/}" | cut -d/ -f1)"; }
IFS=: read -r -a extra <<< "${SID_RUN_BIND:-}"
for d in /root /home "$(top "$PWD")" "$(top "$QE")" "${extra[@]}"; do
  case "$d" in ""|/|/dev|/proc|/sys|/tmp|/run|/usr|/etc|/bin|/lib|/lib64|/sbin|/var) continue;; esac
  [ -d "$d" ] || continue
  grep -q " $S$d " /proc/self/mounts && continue
  mkdir -p "$S$d" && mount --bind "$d" "$S$d" || exit 125
done
exec chroot "$S" /bin/sh -c "cd \"\$0\" 2>/dev/null || cd /; exec \"\$@\"" "$PWD" "$@"
' sid-run "$QE" "$@"
EOF
for t in qemu-system-x86_64 qemu-img; do
    # by absolute path: a PATH that names this wrapper must not loop back into it
    printf '#!/bin/sh\nexec "$(dirname "$(readlink -f "$0")")/sid-run" /usr/bin/%s "$@"\n' $t | install_exe "$QE/bin/$t"
done
fi  # SOURCE=sid
install_exe "$QE/bin/guest-boot" <<'EOF'
#!/bin/bash
# Boot the test guest with sid's QEMU under TCG. Extra args go to QEMU.
# GUEST_APPEND: more kernel args (qe.nvmetest, qe.shell, qe.hold).
# GUEST_KERNEL=vmlinuz for the bzImage.
D=$(dirname "$(readlink -f "$0")")/..
exec "$D/bin/qemu-system-x86_64" -machine q35 -accel tcg -m 512M \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -nographic -no-reboot -nic none -vga none \
  -kernel "$D/guest/${GUEST_KERNEL:-vmlinux}" -initrd "$D/guest/initrd.img" \
  -append "console=ttyS0 panic=-1 quiet ${GUEST_APPEND:-}" "$@"
EOF

# ---------------------------------------------------------------- 2. guest kernel
# guest/.guest-ok marks the kernel (vmlinux, vmlinuz, kernel-version) and the kept
# .debs; modules, busybox and the initrd have their own stamps below.
cd "$G/debs"
if [ ! -e "$G/.guest-ok" ]; then
    KPKG=${KERNEL_PKG:-$(apt-cache depends --important linux-image-amd64 | awk '/Depends:/{print $2; exit}')}
    [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64"
    ls ${KPKG}_*.deb >/dev/null 2>&1 || apt_host -o APT::Sandbox::User=root download "$KPKG"
    ls busybox-static_*.deb >/dev/null 2>&1 || apt_host -o APT::Sandbox::User=root download busybox-static
    rm -rf "$G/kroot"
    say "extracting the kernel from $KPKG ..."
    mkdir -p "$G/kroot"
    dpkg-deb --fsys-tarfile "$(ls ${KPKG}_*.deb | tail -1)" | tar -x -C "$G/kroot" ./boot
    vmlinuz=$(ls "$G/kroot/boot/"vmlinuz-* | head -1)
    KV=${vmlinuz##*/vmlinuz-}
    cp "$vmlinuz" "$G/vmlinuz"
    # Uncompressed ELF vmlinux: QEMU boots it through PVH (the kernel has
    # CONFIG_PVH=y), which skips the xz decompression that is slow under TCG.
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$G/vmlinuz" | head -1 | cut -d: -f1)
    [ -n "$off" ] || die "no xz payload in vmlinuz"
    tail -c +$((off + 1)) "$G/vmlinuz" | xz -dc > "$G/vmlinux.new" 2>/dev/null || true
    [ "$(head -c 4 "$G/vmlinux.new" | od -An -c | tr -d ' ')" = '177ELF' ] || die "vmlinux extraction failed"
    mv "$G/vmlinux.new" "$G/vmlinux"
    echo "$KPKG $KV" > "$G/kernel-version"
    rm -rf "$G/kroot"
    touch "$G/.guest-ok"
fi
read -r KPKG KV < "$G/kernel-version"
KDEB=$(ls "$G/debs/${KPKG}"_*.deb 2>/dev/null | tail -1) || true
BDEB=$(ls "$G/debs/"busybox-static_*.deb 2>/dev/null | tail -1) || true

# ---------------------------------------------------------------- 3. busybox
if [ ! -x "$G/busybox" ]; then
    [ -n "$BDEB" ] || { apt_host -o APT::Sandbox::User=root download busybox-static
                        BDEB=$(ls "$G/debs/"busybox-static_*.deb | tail -1); }
    rm -rf "$G/bbroot"
    dpkg-deb -x "$BDEB" "$G/bbroot"
    cp "$G/bbroot/bin/busybox" "$G/busybox.new" && mv "$G/busybox.new" "$G/busybox"
    rm -rf "$G/bbroot"
fi

# ---------------------------------------------------------------- 4. modules
# guest/modules/ holds the .ko files (decompressed) and modules.order (dependencies
# first; images/guest-modules.sh). Its .list stamp names the kernel and the modules.
want_list="$KV $GUEST_MODULES"
if [ "$(cat "$G/modules/.list" 2>/dev/null)" != "$want_list" ]; then
    if [ -z "$KDEB" ]; then
        apt_host -o APT::Sandbox::User=root download "$KPKG"
        KDEB=$(ls "$G/debs/${KPKG}"_*.deb | tail -1)
    fi
    say "collecting modules: $GUEST_MODULES ..."
    collect_modules "$KDEB" "$KV" "$GUEST_MODULES" "$G/modules.new"
    echo "$want_list" > "$G/modules.new/.list"
    rm -rf "$G/modules"
    mv "$G/modules.new" "$G/modules"
fi

# ---------------------------------------------------------------- 5. /init
cat > "$G/init.new" <<'EOF'
#!/bin/busybox sh
# Appliance test guest /init (INIT_VERSION in images/qemu-env.sh). Prints markers
# on ttyS0; see images/README.md.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo; echo "GUEST-UP uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "GUEST-INSMOD-FAIL $m"; done
echo "GUEST-MODULES-LOADED"

# BAR0-5 of a PCI function from sysfs "resource": " barN=0xSTART+0xSIZE:TYPE" each.
bars() {
  local i=0 s e f t out=
  while read -r s e f; do
    [ $i -lt 6 ] || break
    if [ $((f)) -ne 0 ]; then
      if [ $((f & 0x100)) -ne 0 ]; then t=io; else t=mem; fi
      [ $((f & 0x100000)) -ne 0 ] && t=${t}64
      [ $((f & 0x2000)) -ne 0 ] && t=$t-pref
      [ $((f & 0x20000000)) -ne 0 ] && t=$t-unset
      out="$out $(printf 'bar%d=0x%x+0x%x:%s' $i $((s)) $((e - s + 1)) $t)"
    fi
    i=$((i + 1))
  done < "$1/resource"
  echo "$out"
}
# Capability ids in chain order (" 01 11 10"), walked in the first 256 bytes of
# config space: status bit 4 says a list exists, its head is at 0x34.
pcicaps() {
  local p id n=0 out=
  set -- $(od -An -tu1 -v -N256 "$1/config")
  [ $# -ge 64 ] && [ $(( ${7} & 0x10 )) -ne 0 ] || return 0
  eval p=\${$((0x34 + 1))}
  p=$((p & 0xfc))
  while [ $p -ge 64 ] && [ $p -lt $# ] && [ $n -lt 48 ]; do
    eval id=\${$((p + 1))}
    eval p=\${$((p + 2))}
    out="$out $(printf %02x $id)"
    p=$((p & 0xfc)); n=$((n + 1))
  done
  echo "$out"
}
echo "GUEST-PCI-BEGIN"
for d in /sys/bus/pci/devices/*; do
  drv=-; [ -e $d/driver ] && drv=$(basename $(readlink $d/driver))
  echo "PCI ${d##*/} vendor=$(cat $d/vendor) device=$(cat $d/device) class=$(cat $d/class) driver=$drv$(bars $d)"
  echo "PCICAPS ${d##*/}$(pcicaps $d)"
done
echo "GUEST-PCI-END"
echo "GUEST-NET $(ls /sys/class/net | tr '\n' ' ')"
echo "GUEST-BLOCK $(ls /sys/block | tr '\n' ' ')"
if grep -q 'qe.nvmetest' /proc/cmdline; then
  for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/nvme0n1 ] && break; sleep 1; done
  if [ -b /dev/nvme0n1 ]; then
    echo "GUEST-NVME-PRESENT sectors=$(cat /sys/block/nvme0n1/size) model=$(cat /sys/class/nvme/nvme0/model)"
    i=0; while [ $i -lt 256 ]; do echo "hello-from-guest-block-$i"; i=$((i+1)); done | head -c 4096 > /pattern
    dd if=/pattern of=/dev/nvme0n1 bs=4096 count=1 seek=1 conv=fsync 2>/dev/null
    echo 3 > /proc/sys/vm/drop_caches
    dd if=/dev/nvme0n1 of=/readback bs=4096 count=1 skip=1 2>/dev/null
    if cmp -s /pattern /readback; then echo "GUEST-NVME-RW-OK"; else echo "GUEST-NVME-RW-MISMATCH"; fi
  else
    echo "GUEST-NVME-ABSENT"
  fi
fi
if grep -q 'qe.shell' /proc/cmdline; then
  # Commands arrive on ttyS0 from QEMU's stdin. Echo off and no prompt, so the
  # console shows only what the commands print (tests/integration/qemu.py Guest.run).
  stty -echo 2>/dev/null
  echo "GUEST-SHELL"
  PS1= setsid cttyhack sh -i
  echo "GUEST-SHELL-EXIT"
fi
if grep -q 'qe.hold' /proc/cmdline; then echo "GUEST-HOLDING"; while :; do sleep 3600; done; fi
echo "GUEST-POWEROFF"
poweroff -f
EOF

# ---------------------------------------------------------------- 6. initrd
# Rebuilt (only the initrd) when /init, the module set, busybox or INIT_VERSION change.
# nvme-cli from the chroot: the binary and every library ldd names (sid's glibc runs
# on the guest's kernel), at the same paths.
NVME_BIN=$(if [ -n "$NVME_ROOT" ]; then echo /usr/sbin/nvme; else command -v nvme; fi) || die "no nvme-cli"
NVME_FILES=$(if [ -n "$NVME_ROOT" ]; then chroot "$NVME_ROOT" ldd "$NVME_BIN"; else ldd "$NVME_BIN"; fi | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
NVME_FILES="$NVME_BIN $NVME_FILES"
want_hash=$( { echo "init-version $INIT_VERSION"; cat "$G/init.new" "$G/modules/.list"; sha256sum < "$G/busybox"
               for f in $NVME_FILES; do sha256sum < "$NVME_ROOT$f"; done; } | sha256sum | cut -d' ' -f1)
if [ ! -s "$G/initrd.img" ] || [ "$(cat "$G/initrd.hash" 2>/dev/null)" != "$want_hash" ]; then
    say "building initrd ..."
    R=$G/initrd.d
    rm -rf "$R"
    mkdir -p "$R"/{bin,dev,proc,sys,tmp,mnt,modules}
    cp "$G/busybox" "$R/bin/busybox"
    mknod -m 600 "$R/dev/console" c 5 1
    cp "$G/modules/"*.ko "$R/modules/"
    cp "$G/modules/modules.order" "$R/modules.order"
    for f in $NVME_FILES; do mkdir -p "$R$(dirname "$f")" && cp -L "$NVME_ROOT$f" "$R$f"; done
    cp "$G/init.new" "$R/init"
    chmod +x "$R/init"
    (cd "$R" && find . | "$G/busybox" cpio -o -H newc 2>/dev/null | gzip -9 > "$G/initrd.img.new")
    mv "$G/initrd.img.new" "$G/initrd.img"
    echo "$INIT_VERSION" > "$G/init-version"
    echo "$want_hash" > "$G/initrd.hash"
    rm -rf "$R"
fi
rm -f "$G/init.new"
say "guest: kernel $KV, initrd $(du -k "$G/initrd.img" | cut -f1) KiB (init v$(cat "$G/init-version")), modules: $(tr '\n' ' ' < "$G/modules/modules.order")"

# ---------------------------------------------------------------- smoke boot
if [ -z "${SKIP_BOOT_TEST:-}" ]; then
    say "boot test (TCG) ..."
    t=$SECONDS
    out=$(cd /tmp && timeout 120 "$QE/bin/guest-boot" < /dev/null 2>&1 | tr -d '\r') || true
    echo "$out" | grep -E '(GUEST-|PCI)' | sed 's/^/    /'
    echo "$out" | grep -q GUEST-POWEROFF || die "guest did not boot to GUEST-POWEROFF"
    say "boot test ok in $((SECONDS - t)) s"
fi
say "done. QEMU ($SOURCE): $QE/bin/qemu-system-x86_64   guest: $QE/bin/guest-boot"
