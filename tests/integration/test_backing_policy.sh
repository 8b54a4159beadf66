#!/usr/bin/env bash
# Backing files named by untrusted images: -o backing=deny refuses any,
# -o backing=DIR only regular files below DIR, and outside "allow" a name
# that resolves to a device or into /proc, /sys or /dev is refused.
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

run_case policy case_policy
finish_cases
