# guest-modules.sh - sourced by images/qemu-env.sh and images/debian-guest.sh.
#
# collect_modules KDEB KV "MODULE ..." OUT
#   Unpacks the kernel .deb KDEB (release KV) into a scratch folder next to OUT and
#   copies each named module and everything it depends on into OUT, decompressed,
#   with OUT/modules.order listing them dependencies first (the order insmod needs).
#   Dependencies come from each .ko's modinfo "depends=" (the .deb has no
#   modules.dep and the host has no kmod). A module built into the kernel is
#   skipped; one that is neither built in nor in the .deb is an error (die).
#   The caller provides die().
collect_modules() {
    local kdeb=$1 kv=$2 list=$3 out=$4 kroot md m
    kroot=$out.kroot
    rm -rf "$kroot" "$out"
    mkdir -p "$kroot" "$out"
    dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C "$kroot" ./lib/modules
    md=$kroot/lib/modules/$kv
    declare -A _SEEN=()
    _resolve() {
        local n=$1 p d x
        [ -z "${_SEEN[$n]:-}" ] || return 0
        _SEEN[$n]=1
        p=$(find "$md/kernel" \( -name "$n.ko*" -o -name "${n//_/-}.ko*" -o -name "${n//-/_}.ko*" \) -print -quit)
        if [ -z "$p" ]; then
            grep -qE "/(${n}|${n//_/-}|${n//-/_})\.ko" "$md/modules.builtin" && return 0
            die "module $n not found"
        fi
        x=$(basename "$p"); x=${x%%.ko*}
        case $p in
            *.ko.xz) xz -dc "$p" > "$out/$x.ko";;
            *.ko) cp "$p" "$out/$x.ko";;
            *) die "unsupported module file $p";;
        esac
        d=$(grep -a -o 'depends=[^[:cntrl:]]*' "$out/$x.ko" | head -1 | cut -d= -f2)
        for n in ${d//,/ }; do _resolve "$n"; done
        echo "$x" >> "$out/modules.order"
    }
    : > "$out/modules.order"
    for m in $list; do _resolve "$m"; done
    rm -rf "$kroot"         # 400 MB of unpacked modules, no longer needed
}
