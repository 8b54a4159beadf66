#!/usr/bin/env bash
#
# qcow2check against qemu-img check.  Valid images (16-bit, 1-bit and
# 64-bit refcounts, a compressed image, an image with an internal snapshot)
# are damaged by poking bytes with $TOOLS/mutate: a refcount raised (a
# leak), lowered to 0 for clusters in use (the header, the L1 and L2 tables,
# the refcount table and block, data, compressed data), OFLAG_COPIED cleared
# or wrongly set on L1 and L2 entries, two L2 entries sharing one data
# cluster, the refcount of a free cluster past the end of the file, a
# snapshot's L1 entry zeroed, misaligned, past EOF or with reserved bits,
# and combinations.
#
# For each damaged image:
#   * "qcow2check --output=json" and "qemu-img check --output=json" report
#     the same numbers of leaks and corruptions and exit with the same
#     status (0 clean, 2 corruptions, 3 leaks only);
#   * "qcow2check -r all" on one copy and "qemu-img check -r all" on
#     another: when qemu repairs the image completely, qemu-img check of
#     qcow2check's copy must be clean too (exit 0, no leaks, no errors),
#     otherwise no worse than qemu's; "qemu-img compare" of the two
#     repaired copies and of the damaged image says identical (the guest
#     content did not change).
# Also: "-r leaks" on leak-only images (then qemu-img check is clean), a
# clean image (exit 0), non-qcow2 / empty / missing files (exit 1 with a
# message), and "-r all" while qcow2fuse has the image mounted writable
# (refused by the lock, exit 1).
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io cmp
MUTATE=$(require_tool mutate)
[[ -n ${QCOW2CHECK:-} && -x $QCOW2CHECK ]] || fail "QCOW2CHECK is not set (absolute path of qcow2check)"

K=1024
M=$((1024 * 1024))
BASES="$TEST_TMP/bases"
OFF_MASK=$((0x00fffffffffffe00))
COPIED=$((1 << 63))

# ---------------------------------------------------------------------------
# Images.  Every image has, at known guest offsets:
#   DATA_G    a data cluster with refcount 1 (OFLAG_COPIED set)
#   UNALLOC_G an unallocated cluster whose L2 table exists
#   SHARED_G  (snap) a cluster shared with the snapshot (refcount 2)
# and a free cluster inside the file (discarded data).

make_bases() {
    local r1="$TEST_TMP/r1" x1="$TEST_TMP/x1"
    mkdir -p "$BASES"
    head -c $((4 * M)) /dev/urandom >"$r1"
    seq -f '%015g' 1 262144 >"$x1"
    cd "$BASES"
    qemu-img create -q -f qcow2 -o cluster_size=65536 rc16.qcow2 $((16 * M))
    qio_unmap rc16.qcow2 "write -s $r1 0 $((256 * K))" "write -s $r1 $M $((64 * K))" \
        "write -s $r1 $((8 * M)) $((64 * K))" "discard $((128 * K)) $((64 * K))"

    qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=1 rc1.qcow2 $((16 * M))
    qio_unmap rc1.qcow2 "write -s $r1 0 $((64 * K))" "write -s $r1 $((2 * M)) $((8 * K))" \
        "write -s $r1 $((5 * M)) $((4 * K))" "discard $((16 * K)) $((4 * K))"

    qemu-img create -q -f qcow2 -o cluster_size=65536,refcount_bits=64 rc64.qcow2 $((16 * M))
    qio_unmap rc64.qcow2 "write -s $r1 0 $((256 * K))" "write -s $r1 $M $((64 * K))" \
        "write -s $r1 $((8 * M)) $((64 * K))" "discard $((128 * K)) $((64 * K))"

    { head -c $((2 * M)) "$x1"; head -c $((1 * M)) "$r1"; } >comp.raw
    qemu-img convert -q -c -O qcow2 -o cluster_size=65536 comp.raw comp.qcow2
    rm -f comp.raw
    qemu-img resize -q comp.qcow2 $((16 * M))
    qio_unmap comp.qcow2 "write -s $r1 $((8 * M)) $((192 * K))" "discard $((8 * M)) $((64 * K))"

    qemu-img create -q -f qcow2 -o cluster_size=65536 snap.qcow2 $((16 * M))
    qio_unmap snap.qcow2 "write -s $r1 0 $((256 * K))" "write -s $r1 $((8 * M)) $((128 * K))"
    qemu-img snapshot -c s1 snap.qcow2
    qio_unmap snap.qcow2 "write -s $x1 $((64 * K)) $((64 * K))" "write -s $r1 $M $((64 * K))" \
        "write -s $x1 $((3 * M)) $((128 * K))" "discard $((3 * M)) $((64 * K))"
    cd /
}

# Guest offsets per image: DATA_G UNALLOC_G SHARED_G
offsets_of() {
    case $1 in
    rc16 | rc64) echo "$M $((512 * K)) -" ;;
    rc1) echo "$((2 * M)) $((2 * M + 16 * K)) -" ;;
    comp) echo "$((8 * M + 128 * K)) $((8 * M + 256 * K)) -" ;;
    snap) echo "$((64 * K)) $((4 * M)) 0" ;;
    esac
}

# ---------------------------------------------------------------------------
# Helpers

# info_of IMG KEY: a value from "mutate --info".
info_of() {
    "$MUTATE" --info "$1" | sed -n "s/^$2=//p"
}

# l2e IMG GUEST [SNAP]: "ENTRY_OFFSET VALUE" (decimal) of the L2 entry.
l2e() {
    local out off hex
    out=$("$MUTATE" --l2entry "$@") || fail "mutate --l2entry $* failed"
    [[ $out != none ]] || fail "test setup: no L2 table for guest offset $2"
    read -r off hex <<<"$out"
    echo "$off $((16#$hex))"
}

# host_of IMG GUEST: host cluster index of a data cluster.
host_of() {
    local e v cb
    read -r e v < <(l2e "$1" "$2")
    cb=$(info_of "$1" cluster_bits)
    (((v & OFF_MASK) != 0)) || fail "test setup: guest offset $2 is not allocated"
    echo $(((v & OFF_MASK) >> cb))
}

refcount() { "$MUTATE" --refcount "$1" "$2"; }
set_refcount() { "$MUTATE" --refcount "$1" "$2" "$3" || fail "mutate --refcount $* failed"; }

# poke64 IMG OFFSET VALUE
poke64() {
    "$MUTATE" "$1" "$2" "$(printf '%016x' "$3")" || fail "mutate $1 $2 failed"
}

# free_cluster IMG: a cluster with refcount 0 inside the file.
free_cluster() {
    local n ci
    n=$(info_of "$1" file_clusters)
    for ((ci = 1; ci < n - 1; ci++)); do
        if [[ $(refcount "$1" "$ci") == 0 ]]; then
            echo "$ci"
            return 0
        fi
    done
    fail "test setup: no free cluster inside $(basename "$1")"
}

# json_num FILE KEY: a number from a JSON check report (0 when absent, as
# qemu-img leaves out zero counts).
json_num() {
    local v
    v=$(sed -n "s/^ *\"$2\": *\([0-9][0-9]*\).*/\1/p" "$1" | head -n1)
    echo "${v:-0}"
}

# check_pair IMG: run both checkers in JSON mode; sets Q_LEAKS Q_CORR Q_RC
# (qcow2check) and E_LEAKS E_CORR E_RC (qemu-img).
check_pair() {
    local img=$1
    Q_RC=0
    timeout -k 5 60 "$QCOW2CHECK" --output=json "$img" >"$T/q.json" 2>"$T/q.err" || Q_RC=$?
    ((Q_RC != 124 && Q_RC != 137)) || fail "qcow2check did not finish in 60 s"
    ((Q_RC < 126)) || fail "qcow2check died with status $Q_RC"
    _check_sanitizer_output "$T/q.err" "qcow2check"
    E_RC=0
    qemu-img check --output=json "$img" >"$T/e.json" 2>"$T/e.err" || E_RC=$?
    Q_LEAKS=$(json_num "$T/q.json" leaks) Q_CORR=$(json_num "$T/q.json" corruptions)
    E_LEAKS=$(json_num "$T/e.json" leaks) E_CORR=$(json_num "$T/e.json" corruptions)
}

show_pair() {
    echo "    qcow2check --output=json (exit $Q_RC):" >&2
    sed 's/^/      | /' "$T/q.json" "$T/q.err" >&2
    echo "    qemu-img check --output=json (exit $E_RC):" >&2
    sed 's/^/      | /' "$T/e.json" "$T/e.err" >&2
    echo "    qcow2check (human):" >&2
    "$QCOW2CHECK" "$1" 2>&1 | head -n 20 | sed 's/^/      | /' >&2 || true
    echo "    qemu-img check (human):" >&2
    qemu-img check "$1" 2>&1 | head -n 20 | sed 's/^/      | /' >&2 || true
}

# same_as_qemu IMG WHAT: both checkers agree on leaks, corruptions, status.
same_as_qemu() {
    local img=$1 what=$2
    check_pair "$img"
    info "$what: qcow2check leaks=$Q_LEAKS corruptions=$Q_CORR exit=$Q_RC;" \
        "qemu-img leaks=$E_LEAKS corruptions=$E_CORR exit=$E_RC"
    if [[ $Q_LEAKS != "$E_LEAKS" || $Q_CORR != "$E_CORR" || $Q_RC != "$E_RC" ]]; then
        show_pair "$img"
        fail "$what: qcow2check reports leaks=$Q_LEAKS corruptions=$Q_CORR exit=$Q_RC," \
            "qemu-img check leaks=$E_LEAKS corruptions=$E_CORR exit=$E_RC"
    fi
}

# qemu_counts IMG: sets E_LEAKS E_CORR E_RC from qemu-img check.
qemu_counts() {
    E_RC=0
    qemu-img check --output=json "$1" >"$T/e.json" 2>"$T/e.err" || E_RC=$?
    E_LEAKS=$(json_num "$T/e.json" leaks) E_CORR=$(json_num "$T/e.json" corruptions)
}

# identical A B WHAT: qemu-img compare says the guest contents are equal.
identical() {
    local out rc=0
    out=$(qemu-img compare -f qcow2 -F qcow2 "$1" "$2" 2>&1) || rc=$?
    if ((rc != 0)); then
        echo "    | $out" >&2
        fail "$3: qemu-img compare exit status $rc ($out)"
    fi
}

# repair_all IMG WHAT: qcow2check -r all vs qemu-img check -r all.
repair_all() {
    local img=$1 what=$2 rc=0 a="$T/repaired-q.qcow2" b="$T/repaired-e.qcow2"
    local el ec erc
    cp "$img" "$a"
    cp "$img" "$b"
    timeout -k 5 60 "$QCOW2CHECK" -r all "$a" >"$T/rq.out" 2>&1 || rc=$?
    ((rc != 124 && rc != 137)) || fail "$what: qcow2check -r all did not finish in 60 s"
    ((rc < 126)) || fail "$what: qcow2check -r all died with status $rc"
    _check_sanitizer_output "$T/rq.out" "qcow2check -r all"
    qemu-img check -q -r all "$b" >"$T/re.out" 2>&1 || true
    qemu_counts "$b"
    el=$E_LEAKS ec=$E_CORR erc=$E_RC
    qemu_counts "$a"
    info "$what: after qcow2check -r all (exit $rc): qemu-img check leaks=$E_LEAKS" \
        "corruptions=$E_CORR exit=$E_RC; after qemu-img check -r all: leaks=$el" \
        "corruptions=$ec exit=$erc"
    if ((erc == 0)); then
        if ((E_RC != 0 || E_LEAKS != 0 || E_CORR != 0)); then
            sed 's/^/    qcow2check -r all | /' "$T/rq.out" >&2
            qemu-img check "$a" 2>&1 | sed 's/^/    qemu-img check | /' >&2 || true
            fail "$what: qemu-img check -r all repairs the image, but after qcow2check -r all" \
                "qemu-img check reports leaks=$E_LEAKS corruptions=$E_CORR (exit $E_RC)"
        fi
    elif ((E_LEAKS + E_CORR > el + ec)); then
        sed 's/^/    qcow2check -r all | /' "$T/rq.out" >&2
        fail "$what: after qcow2check -r all qemu-img check reports leaks=$E_LEAKS" \
            "corruptions=$E_CORR, more than after qemu-img check -r all ($el, $ec)"
    fi
    # qcow2check's own verdict on its repaired copy must match qemu's.
    same_as_qemu "$a" "$what, repaired by qcow2check"
    identical "$a" "$b" "$what: the two repaired copies"
    identical "$a" "$img" "$what: repaired copy vs the damaged image"
}

# ---------------------------------------------------------------------------
# Damages: damage_NAME IMG (in place).  Each prints nothing.

damage_leak_free() {
    local ci
    ci=$(free_cluster "$1")
    set_refcount "$1" "$ci" 1
}

damage_leak_raise() {
    local ci v
    ci=$(host_of "$1" "$DATA_G")
    v=$(refcount "$1" "$ci")
    set_refcount "$1" "$ci" $((v + 1))
}

damage_zero_data() {
    local ci
    ci=$(host_of "$1" "$DATA_G")
    set_refcount "$1" "$ci" 0
}
damage_zero_header() { set_refcount "$1" 0 0; }
# cluster_of IMG KEY: the cluster index of the offset "mutate --info" names.
cluster_of() {
    local off cb
    off=$(info_of "$1" "$2")
    cb=$(info_of "$1" cluster_bits)
    [[ -n $off && -n $cb ]] || fail "test setup: no $2 in mutate --info"
    echo $((off >> cb))
}
damage_zero_l1() {
    local ci
    ci=$(cluster_of "$1" l1_offset)
    set_refcount "$1" "$ci" 0
}
damage_zero_l2() {
    local e v cb
    read -r e v < <(l2e "$1" "$DATA_G")
    cb=$(info_of "$1" cluster_bits)
    set_refcount "$1" $((e >> cb)) 0
}
damage_zero_reftable() {
    local ci
    ci=$(cluster_of "$1" refcount_table_offset)
    set_refcount "$1" "$ci" 0
}
damage_zero_refblock() {
    local ci
    ci=$(cluster_of "$1" rt.0)
    set_refcount "$1" "$ci" 0
}

damage_copied_clear_l2() {
    local e v
    read -r e v < <(l2e "$1" "$DATA_G")
    poke64 "$1" "$e" $((v & ~COPIED))
}

damage_copied_clear_l1() {
    local off v
    off=$(info_of "$1" l1_offset)
    v=$((16#$(od -A n -t x1 -j "$off" -N 8 "$1" | tr -d ' \n')))
    poke64 "$1" "$off" $((v & ~COPIED))
}

# Reserved bits in the active L1 entry and in a data cluster's L2 entry:
# the offsets still count as references (for qemu-img check too).
damage_l1_reserved() {
    local off v
    off=$(info_of "$1" l1_offset)
    v=$((16#$(od -A n -t x1 -j "$off" -N 8 "$1" | tr -d ' \n')))
    poke64 "$1" "$off" $((v | 1))
}
damage_l2_reserved() {
    local e v
    read -r e v < <(l2e "$1" "$DATA_G")
    poke64 "$1" "$e" $((v | 2))
}

# Two L2 entries pointing at one data cluster (refcount 1, two references).
damage_double_ref() {
    local e v e2 v2
    read -r e v < <(l2e "$1" "$DATA_G")
    read -r e2 v2 < <(l2e "$1" "$UNALLOC_G")
    ((v2 == 0)) || fail "test setup: guest offset $UNALLOC_G is allocated"
    poke64 "$1" "$e2" "$v"
}

# The refcount of a free cluster past the end of the file.
damage_past_eof() {
    local n
    n=$(info_of "$1" file_clusters)
    set_refcount "$1" $((n + 2)) 1
}

# The active L1 entry cleared (its L2 table and data, at the end of the file,
# become leaks) and the header's refcount zeroed (a refcount too low, so
# "-r all" rebuilds the refcount structures): the rebuild must cope with a
# file whose last clusters are no longer in use.
damage_unref_tail() {
    local off
    off=$(info_of "$1" l1_offset)
    poke64 "$1" "$off" 0
    set_refcount "$1" 0 0
}

damage_combo() {
    damage_leak_free "$1"
    damage_zero_data "$1"
    damage_copied_clear_l1 "$1"
}

# snap: set OFLAG_COPIED on an entry whose cluster is shared (refcount 2).
damage_copied_set_shared() {
    local e v ci
    read -r e v < <(l2e "$1" "$SHARED_G")
    ci=$(host_of "$1" "$SHARED_G")
    [[ $(refcount "$1" "$ci") == 2 ]] || fail "test setup: guest offset $SHARED_G is not shared"
    poke64 "$1" "$e" $((v | COPIED))
}

# snap: the shared cluster's refcount lowered to 1 (two references).
damage_lower_shared() {
    local ci
    ci=$(host_of "$1" "$SHARED_G")
    set_refcount "$1" "$ci" 1
}

# snap: the snapshot's first L1 entry.
snap_l1e() {
    local l1 size
    read -r l1 size _ < <("$MUTATE" --snapshot "$1" 0)
    SNAP_L1E_OFF=$l1
    SNAP_L1E=$((16#$(od -A n -t x1 -j "$l1" -N 8 "$1" | tr -d ' \n')))
    ((SNAP_L1E != 0)) || fail "test setup: the snapshot's L1 entry 0 is empty"
}
damage_snap_l1_zero() { snap_l1e "$1"; poke64 "$1" "$SNAP_L1E_OFF" 0; }
damage_snap_l1_misaligned() { snap_l1e "$1"; poke64 "$1" "$SNAP_L1E_OFF" $((SNAP_L1E + 512)); }
damage_snap_l1_reserved() { snap_l1e "$1"; poke64 "$1" "$SNAP_L1E_OFF" $((SNAP_L1E | 1)); }
damage_snap_l1_past_eof() {
    local cs size
    snap_l1e "$1"
    cs=$(info_of "$1" cluster_size)
    size=$(stat -c %s "$1")
    poke64 "$1" "$SNAP_L1E_OFF" $(((size / cs + 8) * cs))
}
damage_snap_l1_at_active_l2() {
    local e v cs
    snap_l1e "$1"
    read -r e v < <(l2e "$1" "$DATA_G")
    cs=$(info_of "$1" cluster_size)
    poke64 "$1" "$SNAP_L1E_OFF" $((e / cs * cs))
}

# comp: the host cluster holding compressed data.
compressed_cluster() {
    local host cb
    host=$(info_of "$1" first_compressed_host)
    cb=$(info_of "$1" cluster_bits)
    ((host != 0)) || fail "test setup: no compressed cluster"
    echo $((host >> cb))
}
damage_zero_compressed() {
    local ci
    ci=$(compressed_cluster "$1")
    set_refcount "$1" "$ci" 0
}
damage_raise_compressed() {
    local ci v
    ci=$(compressed_cluster "$1")
    v=$(refcount "$1" "$ci")
    set_refcount "$1" "$ci" $((v + 1))
}

# ---------------------------------------------------------------------------
# Cases

setup_case() {
    local base=$1
    IMG="$T/$base.qcow2"
    cp "$BASES/$base.qcow2" "$IMG"
    read -r DATA_G UNALLOC_G SHARED_G _ < <(offsets_of "$base")
}

case_damage() {
    local base=$1 damage=$2 what
    setup_case "$base"
    what="$base/$damage"
    "damage_$damage" "$IMG"
    same_as_qemu "$IMG" "$what"
    ((E_RC != 0)) || info "$what: (qemu-img check finds nothing wrong)"
    repair_all "$IMG" "$what"
}

# case_damage_detected BASE DAMAGE: both checkers find corruptions (the
# counts may differ: for a misaligned L2 offset qemu-img reads the table at
# the misaligned offset and counts whatever it finds there), and -r all
# leaves nothing worse than qemu-img check -r all does.
case_damage_detected() {
    local base=$1 damage=$2 what
    setup_case "$base"
    what="$base/$damage"
    "damage_$damage" "$IMG"
    check_pair "$IMG"
    info "$what: qcow2check leaks=$Q_LEAKS corruptions=$Q_CORR exit=$Q_RC;" \
        "qemu-img leaks=$E_LEAKS corruptions=$E_CORR exit=$E_RC"
    if ((Q_RC != 2 || E_RC != 2)); then
        show_pair "$IMG"
        fail "$what: expected both checkers to report corruptions (exit 2)"
    fi
}

case_leaks_only() {
    local base=$1 rc=0
    setup_case "$base"
    damage_leak_free "$IMG"
    same_as_qemu "$IMG" "$base/leak"
    ((E_RC == 3 && E_LEAKS == 1)) || fail "test setup: expected qemu-img check to report 1 leak"
    cp "$IMG" "$T/orig.qcow2"
    "$QCOW2CHECK" -r leaks "$IMG" >"$T/r.out" 2>&1 || rc=$?
    ((rc == 0)) || { sed 's/^/    | /' "$T/r.out" >&2; fail "qcow2check -r leaks exited with status $rc"; }
    grep -q '1 leaked clusters' "$T/r.out" || info "qcow2check -r leaks said: $(head -n3 "$T/r.out" | tr '\n' ' ')"
    qemu_counts "$IMG"
    ((E_RC == 0 && E_LEAKS == 0 && E_CORR == 0)) \
        || fail "after qcow2check -r leaks, qemu-img check reports leaks=$E_LEAKS corruptions=$E_CORR (exit $E_RC)"
    identical "$IMG" "$T/orig.qcow2" "after qcow2check -r leaks"
    # json after the repair reports what was fixed
    same_as_qemu "$IMG" "$base/leak repaired"
}

# -r leaks on an image with leaks and a corruption: the leaks go, the
# corruption stays, exactly as with qemu-img check -r leaks.
case_leaks_mode_on_corrupt() {
    local base=$1 rc=0
    setup_case "$base"
    damage_leak_free "$IMG"
    damage_zero_data "$IMG"
    cp "$IMG" "$T/e.qcow2"
    "$QCOW2CHECK" -r leaks "$IMG" >"$T/r.out" 2>&1 || rc=$?
    qemu-img check -q -r leaks "$T/e.qcow2" >/dev/null 2>&1 || true
    same_as_qemu "$T/e.qcow2" "$base: after qemu-img check -r leaks (qemu vs qcow2check)"
    local el=$E_LEAKS ec=$E_CORR erc=$E_RC
    qemu_counts "$IMG"
    info "after qcow2check -r leaks (exit $rc): qemu-img check leaks=$E_LEAKS corruptions=$E_CORR exit=$E_RC;" \
        "after qemu-img check -r leaks: leaks=$el corruptions=$ec exit=$erc"
    # The corruption is not repaired by -r leaks, the leak may be (qemu-img
    # leaves it when refcounts are too low elsewhere; fixing it is better).
    ((rc == erc)) || fail "qcow2check -r leaks exited with $rc, qemu-img check -r leaks with $erc"
    ((E_CORR == ec && E_LEAKS <= el)) \
        || fail "after qcow2check -r leaks: leaks=$E_LEAKS corruptions=$E_CORR; after qemu-img: $el, $ec"
}

case_clean() {
    local base=$1
    setup_case "$base"
    same_as_qemu "$IMG" "$base (clean)"
    ((Q_RC == 0 && Q_LEAKS == 0 && Q_CORR == 0)) || fail "clean image: qcow2check exit $Q_RC"
    "$QCOW2CHECK" "$IMG" >"$T/h.out" 2>&1 || fail "clean image: qcow2check (human output) failed"
    grep -q 'No errors were found' "$T/h.out" || fail "clean image: no 'No errors were found' line"
    # -r all on a clean image changes nothing
    cp "$IMG" "$T/before.qcow2"
    "$QCOW2CHECK" -r all "$IMG" >"$T/r.out" 2>&1 || fail "clean image: qcow2check -r all failed"
    cmp -s "$IMG" "$T/before.qcow2" || fail "clean image: qcow2check -r all modified the file"
}

# expect_exit1 FILE WHAT: qcow2check exits 1 with a message on stderr.
expect_exit1() {
    local rc=0
    "$QCOW2CHECK" "$1" >"$T/o.out" 2>"$T/o.err" || rc=$?
    ((rc == 1)) || { sed 's/^/    | /' "$T/o.out" "$T/o.err" >&2; fail "$2: exit status $rc, expected 1"; }
    [[ -s $T/o.err ]] || fail "$2: no message on stderr"
    _check_sanitizer_output "$T/o.err" "qcow2check"
    info "$2: $(head -n1 "$T/o.err")"
}

case_not_qcow2() {
    head -c $((1 * M)) /dev/urandom >"$T/random.img"
    printf 'XXXX' | dd of="$T/random.img" conv=notrunc status=none
    expect_exit1 "$T/random.img" "random file"
    grep -Eqi 'qcow2|magic' "$T/o.err" || fail "random file: the message mentions neither qcow2 nor the magic"
    : >"$T/empty.img"
    expect_exit1 "$T/empty.img" "empty file"
    expect_exit1 "$T/does-not-exist.qcow2" "missing file"
    grep -q 'does-not-exist' "$T/o.err" || fail "missing file: the message does not name the file"
    head -c 50 "$BASES/rc16.qcow2" >"$T/short.qcow2"
    expect_exit1 "$T/short.qcow2" "50-byte file"
}

case_locked() {
    local rc=0
    requires_fuse
    setup_case rc16
    mount_image "$IMG" "$T/mnt"
    "$QCOW2CHECK" -r all "$IMG" >"$T/o.out" 2>"$T/o.err" || rc=$?
    ((rc == 1)) || { sed 's/^/    | /' "$T/o.out" "$T/o.err" >&2; fail "qcow2check -r all on a mounted image: exit status $rc, expected 1"; }
    grep -Eqi 'lock|in use|busy' "$T/o.err" || { sed 's/^/    | /' "$T/o.err" >&2; fail "the refusal does not mention the lock"; }
    info "refused: $(head -n1 "$T/o.err")"
    rc=0
    "$QCOW2CHECK" -r leaks "$IMG" >"$T/o.out" 2>"$T/o.err" || rc=$?
    ((rc == 1)) || fail "qcow2check -r leaks on a mounted image: exit status $rc, expected 1"
    unmount_image "$T/mnt"
    # and once unmounted it works
    "$QCOW2CHECK" -r all "$IMG" >"$T/o.out" 2>&1 || fail "qcow2check -r all after the unmount failed"
}

make_bases

run_case not_qcow2 case_not_qcow2
run_case locked case_locked
for b in rc16 rc1 rc64 comp snap; do
    run_case "$b.clean" case_clean "$b"
done
for b in rc16 rc1 rc64; do
    run_case "$b.leaks_only" case_leaks_only "$b"
done
run_case rc16.leaks_mode_on_corrupt case_leaks_mode_on_corrupt rc16

generic="leak_free zero_data zero_header zero_l1 zero_l2 zero_reftable zero_refblock
         copied_clear_l2 copied_clear_l1 double_ref past_eof l1_reserved l2_reserved
         unref_tail combo"
for b in rc16 rc1 rc64 comp snap; do
    for d in $generic; do
        run_case "$b.$d" case_damage "$b" "$d"
    done
done
for b in rc16 rc64 snap; do
    run_case "$b.leak_raise" case_damage "$b" leak_raise
done
for d in copied_set_shared lower_shared snap_l1_zero snap_l1_reserved snap_l1_past_eof \
    snap_l1_at_active_l2; do
    run_case "snap.$d" case_damage snap "$d"
done
run_case snap.snap_l1_misaligned case_damage_detected snap snap_l1_misaligned
run_case comp.zero_compressed case_damage comp zero_compressed
run_case comp.raise_compressed case_damage comp raise_compressed

finish_cases
