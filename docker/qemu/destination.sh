#!/usr/bin/env bash
# qemu-destination service of docker-compose.qemu.yml: an empty qcow2 image of the
# source's virtual size, opened by qemu-storage-daemon; `bitmig dest --qmp` gives every
# bitmap it receives to that qemu-storage-daemon before acknowledging it. Runs until
# stopped; then qemu-storage-daemon writes the persistent bitmaps into the image.
set -euo pipefail
source "$(dirname "$0")/qsd.sh"

log "creating empty $IMG ($SIZE)"
qemu-img create -q -f qcow2 "$IMG" "$SIZE"
start_qsd

bitmig dest --qmp "$RUN/bitmig.sock" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
rc=0
wait "$pid" || rc=$?
# a trapped signal ends `wait` early (status 128+n): wait again for bitmig dest's own status
if ((rc > 128)); then
    rc=0
    wait "$pid" || rc=$?
fi
stop_qsd
exit "$rc"
