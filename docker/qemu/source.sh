#!/usr/bin/env bash
# qemu-source service of docker-compose.qemu.yml: a qcow2 image with three persistent
# bitmaps, opened by qemu-storage-daemon, whose bitmaps `bitmig source --qmp` migrates
# to the destination. The container then stays up (as a VM would) with $RUN/migrated
# present, which is its health check; if the migration fails it exits with bitmig's
# status.
set -euo pipefail
source "$(dirname "$0")/qsd.sh"

DEST=${BITMIG_QEMU_DESTINATION:?host:port of the destination}
WRITES=${BITMIG_QEMU_WRITES:-40}
# the bits are random; BITMIG_QEMU_SEED repeats a run
SEED=${BITMIG_QEMU_SEED:-$((RANDOM << 15 | RANDOM))}
RANDOM=$SEED

# qemu-io writes WRITES random extents (4 KiB .. 260 KiB, 512-byte aligned) into the image;
# QEMU itself marks them in every enabled bitmap
random_writes() {
    local size sectors n len off cmds=()
    size=$(numfmt --from=iec "$SIZE")
    sectors=$((size / 512))
    for ((n = 0; n < WRITES; n++)); do
        len=$(( (RANDOM % 512 + 8) * 512 ))
        off=$(( ((RANDOM << 30 | RANDOM << 15 | RANDOM) % (sectors - len / 512)) * 512 ))
        cmds+=(-c "write -q -P $((RANDOM % 255 + 1)) $off $len")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$IMG"
}

log "creating $IMG ($SIZE), seed $SEED"
qemu-img create -q -f qcow2 "$IMG" "$SIZE"
qemu-img bitmap -f qcow2 --add -g 64K "$IMG" daily    # enabled, 64 KiB
qemu-img bitmap -f qcow2 --add -g 1M "$IMG" weekly    # 1 MiB, disabled below
random_writes                                          # into daily and weekly
qemu-img bitmap -f qcow2 --disable "$IMG" weekly
random_writes                                          # into daily only
qemu-img bitmap -f qcow2 --add -g 1M "$IMG" fresh     # enabled, empty
qemu-img info "$IMG" >&2

trap 'stop_qsd' EXIT
start_qsd
# QEMU's answer before bitmig touches anything: the test compares the end state with it
python3 "$(dirname "$0")/qmp-bitmaps.py" "$RUN/qmp.sock" > "$RUN/before.json"

bitmig source --qmp "$RUN/bitmig.sock" --node "$NODE" --control "$RUN/source.sock" \
    --migrate-to "$DEST" &
pid=$!
# No guest writes here (the image's writer, qemu-io, is done), so the migration may
# freeze at once: say `complete` to every attempt, the orchestrator's part (docs/qemu.md).
(
    while kill -0 "$pid" 2>/dev/null; do
        bitmig ctl "$RUN/source.sock" complete >/dev/null 2>&1 || true
        sleep 1
    done
) &
rc=0
wait "$pid" || rc=$?
if ((rc != 0)); then
    log "bitmig source exited $rc"
    exit "$rc"
fi
touch "$RUN/migrated"
log "migrated; qemu-storage-daemon keeps running (docker stop ends it)"
trap 'stop_qsd; exit 0' TERM INT
tail --pid="$QSD_PID" -f /dev/null &
wait $!
