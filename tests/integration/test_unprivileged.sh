#!/usr/bin/env bash
# The daemon run by an unprivileged user, as people who cannot use
# qemu-nbd do: the user creates an image with qemu-img, mounts it with
# qcow2fuse (fusermount3, setuid root, does the mount), writes with dd and
# fsyncs, unmounts with fusermount3 -u; then qemu-img check is clean and
# qemu-img compare finds the image equal to the same writes on a raw file.
#
# Needs root to set up: it creates a system user (and removes it after,
# if it made it), makes /dev/fuse usable for it (mode 0666; the original
# mode is put back at exit) and works in a directory of its own under /tmp
# (the run's TMPDIR is root's, mode 0700).  Runs of this test are
# serialized by a lock, so that one cannot put /dev/fuse's mode back under
# another.
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img runuser useradd userdel flock fusermount3 dd cmp

[[ $EUID == 0 ]] || skip "needs root to create a user and open /dev/fuse to it"
fm=$(command -v fusermount3)
[[ -u $fm && $(stat -c %u "$fm") == 0 ]] ||
    skip "$fm is not setuid root: an unprivileged user cannot mount FUSE file systems here (Debian's fuse3 package installs it setuid)"

USER_NAME=qcow2fuse-unpriv
FUSE_MODE=""            # /dev/fuse's mode before this test, to put back
MADE_USER=0
U=""                    # the user's directory

restore() {
    local rc=$?
    set +e
    trap - ERR
    _cleanup_scope      # the user's daemon must be gone before userdel
    _MOUNTS=() _PIDS=()
    [[ -z $FUSE_MODE ]] || chmod "$FUSE_MODE" /dev/fuse
    if ((MADE_USER)); then
        userdel "$USER_NAME" || echo "cleanup: userdel $USER_NAME failed" >&2
    fi
    [[ -z $U ]] || rm -rf --one-file-system "$U"
    (exit "$rc")
    cleanup
}
trap restore EXIT

exec {lock_fd}>/run/qcow2fuse-test-unprivileged.lock
flock -w 300 "$lock_fd" || fail "another run of this test holds /run/qcow2fuse-test-unprivileged.lock"

if ! id -u "$USER_NAME" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$USER_NAME" || fail "useradd $USER_NAME failed"
    MADE_USER=1
fi
uid=$(id -u "$USER_NAME")
((uid != 0)) || fail "$USER_NAME has uid 0"
as_user() { runuser -u "$USER_NAME" -- "$@"; }

FUSE_MODE=$(stat -c %a /dev/fuse)
chmod 0666 /dev/fuse

U=$(mktemp -d /tmp/qcow2fuse-unpriv.XXXXXX)
chmod 0755 "$U"
mkdir "$U/mnt"
cp "$QCOW2FUSE" "$U/qcow2fuse"     # the build tree may be closed to the user
head -c 1M /dev/urandom >"$U/data"
chmod 0644 "$U/data"
chown "$USER_NAME:" "$U/mnt"
chmod 0700 "$U/mnt"
install -d -o "$USER_NAME" -g "$USER_NAME" -m 0700 "$U/home"

[[ $(as_user id -u) == "$uid" ]] || fail "runuser did not run as $USER_NAME"
as_user qemu-img create -q -f qcow2 "$U/home/img.qcow2" 64M || fail "the user's qemu-img create failed"

log=$T/daemon.log
as_user "$U/qcow2fuse" -f "$U/home/img.qcow2" "$U/mnt" >"$log" 2>&1 &
pid=$!
track_mount "$U/mnt" "$pid"
for ((i = 0; i < MOUNT_TIMEOUT * 20; i++)); do
    is_mounted "$U/mnt" && break
    pid_alive "$pid" || { sed 's/^/    | /' "$log" >&2; fail "the user's qcow2fuse exited before mounting"; }
    sleep 0.05
done
is_mounted "$U/mnt" || fail "the user's qcow2fuse did not mount within ${MOUNT_TIMEOUT}s"
grep -q " $U/mnt fuse.qcow2fuse .*user_id=$uid," /proc/mounts ||
    fail "the mount is not the user's: $(grep " $U/mnt " /proc/mounts)"
# Without allow_other, only the user can look inside (root too is refused).
[[ $(as_user stat -c %u "$U/mnt/disk") == "$uid" ]] || fail "disk is not owned by the user"

# An aligned 1 MiB write and an unaligned one across a cluster boundary,
# each made durable (dd's fsync), then the unmount.
as_user dd if="$U/data" of="$U/mnt/disk" bs=64k seek=80 conv=notrunc,fsync status=none ||
    fail "the user's aligned write failed"
as_user dd if="$U/data" of="$U/mnt/disk" bs=70000 count=1 seek=$((3 * 65536 - 1234)) \
    oflag=seek_bytes conv=notrunc,fsync status=none ||
    fail "the user's unaligned write failed"
as_user fusermount3 -u "$U/mnt" || fail "the user's fusermount3 -u failed"
for ((i = 0; i < EXIT_TIMEOUT * 20; i++)); do
    pid_alive "$pid" || break
    sleep 0.05
done
pid_alive "$pid" && fail "qcow2fuse still running ${EXIT_TIMEOUT}s after fusermount3 -u"
rc=0
wait "$pid" || rc=$?
((rc == 0)) || { sed 's/^/    | /' "$log" >&2; fail "the user's qcow2fuse exited with status $rc"; }

# The same writes on a raw file are the oracle.
truncate -s 64M "$T/expect.raw"
dd if="$U/data" of="$T/expect.raw" bs=64k seek=80 conv=notrunc status=none
dd if="$U/data" of="$T/expect.raw" bs=70000 count=1 seek=$((3 * 65536 - 1234)) \
    oflag=seek_bytes conv=notrunc status=none
[[ $(stat -c %u "$U/home/img.qcow2") == "$uid" ]] || fail "the image is no longer the user's"
check_clean "$U/home/img.qcow2" "written by $USER_NAME"
check_identical "$U/home/img.qcow2" "$T/expect.raw" "written by $USER_NAME"
info "as $USER_NAME (uid $uid): mounted, wrote, fsynced, unmounted with fusermount3 -u"
