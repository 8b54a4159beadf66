#!/usr/bin/env bash
# Backing files named by untrusted images: -o backing=deny refuses any,
# -o backing=DIR only regular files below DIR, and outside "allow" a name
# that resolves to a device or into /proc, /sys or /dev is refused.
# A daemon running as root opens what an image owned by another user names
# only if that user could open it (the owner cases below need root).
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io

case_policy() {
    local mnt=$T/mnt
    mkdir -p "$T/trusted" "$T/elsewhere"
    qemu-img create -q -f raw "$T/trusted/base.raw" 8M
    qio "$T/trusted/base.raw" "write -P 0x44 0 8M"
    cp "$T/trusted/base.raw" "$T/elsewhere/base.raw"
    qemu-img create -q -f qcow2 -b base.raw -F raw "$T/trusted/in.qcow2"
    qemu-img create -q -f qcow2 -b "$T/elsewhere/base.raw" -F raw "$T/trusted/out.qcow2"
    # A name that points at a device; qemu-img would open it, so poke it in.
    qemu-img create -q -f qcow2 -b "$T/trusted/base.raw" -F raw "$T/trusted/dev.qcow2" 8M
    qemu-img rebase -u -f qcow2 -b /dev/zero -F raw "$T/trusted/dev.qcow2"

    expect_refusal "$T/trusted/in.qcow2" "$mnt" ro,backing=deny
    stderr_mentions "backing=deny"

    mount_image "$T/trusted/in.qcow2" "$mnt" "ro,backing=$T/trusted"
    cmp "$mnt/disk" "$T/trusted/base.raw" || fail "overlay inside the allowed directory reads wrong data"
    unmount_image "$mnt"

    expect_refusal "$T/trusted/out.qcow2" "$mnt" "ro,backing=$T/trusted"
    stderr_mentions "outside the allowed directory"

    expect_refusal "$T/trusted/dev.qcow2" "$mnt" "ro,backing=$T/trusted"
    stderr_mentions "not a regular file"

    # The default (allow) follows any name, as QEMU does.
    mount_image "$T/trusted/out.qcow2" "$mnt" ro
    cmp "$mnt/disk" "$T/elsewhere/base.raw" || fail "default policy: wrong data"
    unmount_image "$mnt"
}

# The owner cases: images owned by nobody, mounted by root.  The case's
# scratch directory (and the test's, above it) is made searchable by
# everyone where nobody must reach a file in it; /etc/shadow is only read
# through the mount in a case whose directory stays 0700.
needs_root_and_nobody() {
    [[ $(id -u) == 0 ]] || skip "needs root (chown, acting for another user)"
    id nobody >/dev/null 2>&1 || skip "no user nobody"
    requires setpriv
}

# searchable_by_all: let every user reach (not list) $T: it and the private
# scratch directories above it (run.sh's and this test's, named qcow2fuse-*
# or case-*) get o+x, up to the first directory that has it already.
searchable_by_all() {
    local d=$T
    while [[ $d != / ]] && ! setpriv --reuid=nobody --regid=nogroup --clear-groups \
        test -x "$d" 2>/dev/null; do
        case $(basename "$d") in
        qcow2fuse-* | case-* | test_*) chmod o+x "$d" ;;
        *) skip "nobody cannot reach $d, which this test did not create" ;;
        esac
        d=$(dirname "$d")
    done
}

# An image owned by nobody naming /etc/shadow as its raw backing file: QEMU
# would show the file; we refuse unless -o backing=allow.  Owned by root, it
# opens as before.
case_owner_shadow() {
    needs_root_and_nobody
    [[ -f /etc/shadow ]] || skip "no /etc/shadow"
    local mnt=$T/mnt
    qemu-img create -q -f qcow2 -b /etc/shadow -F raw "$T/evil.qcow2" 64M
    chown nobody "$T/evil.qcow2"

    expect_refusal "$T/evil.qcow2" "$mnt" ro
    stderr_mentions '"/etc/shadow"' 'user nobody \(uid [0-9]+\)' 'backing=allow' \
        'evil\.qcow2'

    mount_image "$T/evil.qcow2" "$mnt" ro,backing=allow
    compare_raw "$T/evil.qcow2" "$mnt"
    unmount_image "$mnt"

    chown root "$T/evil.qcow2"
    mount_image "$T/evil.qcow2" "$mnt" ro
    compare_raw "$T/evil.qcow2" "$mnt"
    unmount_image "$mnt"
}

# Files nobody can read open, through a qcow2 link and a raw one, and read
# what qemu reads.
case_owner_readable() {
    needs_root_and_nobody
    searchable_by_all
    local mnt=$T/mnt
    qemu-img create -q -f raw "$T/base.raw" 8M
    qio "$T/base.raw" "write -P 0x51 0 8M"
    qemu-img create -q -f qcow2 -b base.raw -F raw "$T/mid.qcow2"
    qio "$T/mid.qcow2" "write -P 0x52 1M 1M"
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$T/top.qcow2"
    qio "$T/top.qcow2" "write -P 0x53 3M 512k"
    chmod 0644 "$T/base.raw" "$T/mid.qcow2"
    chown nobody "$T/top.qcow2"

    mount_image "$T/top.qcow2" "$mnt" ro
    compare_raw "$T/top.qcow2" "$mnt"
    unmount_image "$mnt"
}

# A backing file nobody cannot open: mode 0600, or in a directory nobody
# cannot search; or the second link of a chain.  And an image owned by root
# whose backing image, owned by nobody, names a file nobody cannot read.
case_owner_unreadable() {
    needs_root_and_nobody
    searchable_by_all
    local mnt=$T/mnt
    mkdir -m 0700 "$T/private"
    qemu-img create -q -f raw "$T/secret.raw" 8M
    qio "$T/secret.raw" "write -P 0x61 0 8M"
    cp "$T/secret.raw" "$T/private/hidden.raw"
    cp "$T/secret.raw" "$T/open.raw"
    chmod 0600 "$T/secret.raw"
    chmod 0644 "$T/private/hidden.raw" "$T/open.raw"

    qemu-img create -q -f qcow2 -b secret.raw -F raw "$T/a.qcow2"
    chown nobody "$T/a.qcow2"
    expect_refusal "$T/a.qcow2" "$mnt" ro
    stderr_mentions "$T/secret\.raw" 'user nobody' 'backing=allow'

    qemu-img create -q -f qcow2 -b private/hidden.raw -F raw "$T/b.qcow2"
    chown nobody "$T/b.qcow2"
    expect_refusal "$T/b.qcow2" "$mnt" ro
    stderr_mentions 'private/hidden\.raw' 'user nobody' 'backing=allow'

    # top (nobody) -> mid (root, 0644) -> secret.raw (root, 0600)
    qemu-img create -q -f qcow2 -b secret.raw -F raw "$T/mid.qcow2"
    chmod 0644 "$T/mid.qcow2"
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$T/c.qcow2"
    chown nobody "$T/c.qcow2"
    expect_refusal "$T/c.qcow2" "$mnt" ro
    stderr_mentions "$T/secret\.raw" 'mid\.qcow2' 'user nobody' 'top image' \
        'backing=allow'
    mount_image "$T/c.qcow2" "$mnt" ro,backing=allow
    compare_raw "$T/c.qcow2" "$mnt"
    unmount_image "$mnt"

    # top (root) -> nobody's image -> secret.raw: whoever owns a link chose
    # the name it carries.
    qemu-img create -q -f qcow2 -b secret.raw -F raw "$T/users.qcow2"
    chown nobody "$T/users.qcow2"
    qemu-img create -q -f qcow2 -b users.qcow2 -F qcow2 "$T/d.qcow2"
    expect_refusal "$T/d.qcow2" "$mnt" ro
    stderr_mentions "$T/secret\.raw" 'users\.qcow2' 'user nobody' 'backing=allow'

    # ... and the same chains over a file nobody can read open.
    qemu-img rebase -u -f qcow2 -b open.raw -F raw "$T/users.qcow2"
    mount_image "$T/d.qcow2" "$mnt" ro
    compare_raw "$T/d.qcow2" "$mnt"
    unmount_image "$mnt"
}

# An external data file is as much a way out as a backing file: opened for
# the owner too, for writing when the mount is writable.
case_owner_data_file() {
    needs_root_and_nobody
    searchable_by_all
    local mnt=$T/mnt
    qemu-img create -q -f qcow2 -o data_file="$T/x.data",data_file_raw=on "$T/x.qcow2" 8M
    qio "$T/x.qcow2" "write -P 0x81 0 3M"
    chown nobody "$T/x.qcow2"
    chmod 0600 "$T/x.data"
    expect_refusal "$T/x.qcow2" "$mnt" ro
    stderr_mentions "external data file \"$T/x\.data\"" 'user nobody' 'backing=allow'

    chmod 0644 "$T/x.data"
    mount_image "$T/x.qcow2" "$mnt" ro
    compare_raw "$T/x.qcow2" "$mnt"
    unmount_image "$mnt"
    # nobody may read it, not write it
    expect_refusal "$T/x.qcow2" "$mnt"
    stderr_mentions "external data file \"$T/x\.data\"" 'user nobody' 'cannot open'
    chown nobody "$T/x.data"
    mount_image "$T/x.qcow2" "$mnt"
    compare_raw "$T/x.qcow2" "$mnt"
    unmount_image "$mnt"
}

# The daemon itself running as nobody (no root to act for anyone): images
# nobody can read work as before, /etc/shadow is refused by the kernel.
# Mounting as nobody needs /dev/fuse open to nobody, for the moment of the
# mount only; without allow_other only nobody may use the mount.
FUSE_MODE=""
open_dev_fuse() {
    chmod 0666 /dev/fuse
}
close_dev_fuse() {
    chmod "$FUSE_MODE" /dev/fuse
}
# EXIT trap of the case: put /dev/fuse back whatever happened, then the
# usual cleanup with the case's exit status.
# shellcheck disable=SC2016  # expanded when the trap runs
close_dev_fuse_trap='_st=$?; set +e; trap - ERR; chmod "$FUSE_MODE" /dev/fuse; (exit "$_st"); cleanup'

as_nobody() {
    setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"
}

# mount_as_nobody IMG MNT: try_mount for a daemon running as nobody (root
# may not look into that mount, so nobody checks that it is up).
mount_as_nobody() {
    local img=$1 mnt pid log deadline
    mnt=$(canon_path "$2")
    log="$T/daemon.$(_seq).log"
    deadline=$(($(date +%s%N) + MOUNT_TIMEOUT * 1000000000))
    (cd / && exec setpriv --reuid=nobody --regid=nogroup --clear-groups \
        "$T/qcow2fuse" -f -o "$(with_transport ro)" "$img" "$mnt") </dev/null >"$log" 2>&1 &
    pid=$!
    track_mount "$mnt" "$pid"
    _MNT_PID[$mnt]=$pid     # for unmount_image
    _MNT_LOG[$mnt]=$log
    until is_mounted "$mnt" && as_nobody test -e "$mnt/disk"; do
        if ! pid_alive "$pid"; then
            sed 's/^/    | /' "$log" >&2
            fail "daemon (as nobody) exited before the mount came up"
        fi
        (($(date +%s%N) < deadline)) || fail "mount as nobody not ready after ${MOUNT_TIMEOUT}s"
        sleep 0.01
    done
    [[ $(stat -c %U "/proc/$pid") == nobody ]] || fail "the daemon does not run as nobody"
}

case_nonroot_daemon() {
    needs_root_and_nobody
    [[ -u $(command -v fusermount3) ]] || skip "fusermount3 is not setuid root"
    searchable_by_all
    local mnt=$T/mnt ref
    mkdir "$mnt"
    chown nobody "$mnt"
    # The build tree may be private to root: run a copy.
    cp "$QCOW2FUSE" "$T/qcow2fuse"
    chmod 0755 "$T/qcow2fuse"

    qemu-img create -q -f raw "$T/base.raw" 8M
    qio "$T/base.raw" "write -P 0x71 0 8M"
    chmod 0644 "$T/base.raw"
    qemu-img create -q -f qcow2 -b base.raw -F raw "$T/top.qcow2"
    qio "$T/top.qcow2" "write -P 0x72 2M 1M"
    qemu-img create -q -f qcow2 -b /etc/shadow -F raw "$T/evil.qcow2" 64M
    chown nobody "$T/top.qcow2" "$T/evil.qcow2"

    FUSE_MODE=$(stat -c %a /dev/fuse)
    # shellcheck disable=SC2064  # the variable holds the trap's own text
    trap "$close_dev_fuse_trap" EXIT
    open_dev_fuse
    mount_as_nobody "$T/top.qcow2" "$mnt"
    close_dev_fuse
    ref=$(ref_raw "$T/top.qcow2")
    as_nobody cat "$mnt/disk" >"$T/seen.raw" || fail "nobody cannot read $mnt/disk"
    same_bytes "$T/seen.raw" "$ref" "top.qcow2 read by nobody vs qemu-img convert"
    unmount_image "$mnt"

    printf '#!/bin/sh\nexec setpriv --reuid=nobody --regid=nogroup --clear-groups %s "$@"\n' \
        "$T/qcow2fuse" >"$T/as-nobody"
    chmod 0755 "$T/as-nobody"
    open_dev_fuse
    QCOW2FUSE=$T/as-nobody expect_refusal "$T/evil.qcow2" "$mnt" ro
    close_dev_fuse
    stderr_mentions 'cannot open backing file /etc/shadow' 'permission denied'
}

run_case policy case_policy
run_case owner_shadow case_owner_shadow
run_case owner_readable case_owner_readable
run_case owner_unreadable case_owner_unreadable
run_case owner_data_file case_owner_data_file
run_case nonroot_daemon case_nonroot_daemon
finish_cases
