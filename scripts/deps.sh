#!/bin/sh
# scripts/deps.sh PACKAGE...: install the Debian packages of the list that
# are missing (make deps; make check and make demo run it first).  With
# everything present it is a no-op: one dpkg-query, one line of output, no
# apt-get and no root needed.  Installing needs root (or sudo).  Where
# there is no dpkg-query (not Debian), it checks the build libraries with
# pkg-config and leaves the installing to the user.
set -eu

if ! command -v dpkg-query >/dev/null 2>&1; then
    if pkg-config --exists fuse3 zlib libzstd check 2>/dev/null; then
        echo "deps: not a Debian system; fuse3, zlib, libzstd and check found by pkg-config" \
            "(install qemu-img, fio and e2fsprogs for the tests yourself)"
        exit 0
    fi
    echo "deps: not a Debian system and pkg-config does not find fuse3, zlib, libzstd" \
        "and check: install their development files (see README)" >&2
    exit 1
fi

# One dpkg-query for the whole list; a package it does not know at all is
# missing as well (it prints nothing for it).
installed=$(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null |
    awk '$NF == "installed" && $(NF - 1) == "ok" { sub(":.*", "", $1); print $1 }')
missing=""
for p in "$@"; do
    printf '%s\n' "$installed" | grep -qx -- "$p" || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "deps: all build and test dependencies are installed"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "deps: missing:$missing; as root: apt-get install$missing" >&2
        exit 1
    fi
    sudo=sudo
fi
echo "deps: installing:$missing"
# shellcheck disable=SC2086  # $missing is a list of package names
$sudo apt-get update
# shellcheck disable=SC2086
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y $missing
