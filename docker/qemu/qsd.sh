# Sourced by source.sh and destination.sh: the image and qemu-storage-daemon they share.
#
# The image's format node is $NODE; qemu-storage-daemon gets two QMP monitors, because a
# monitor serves one client at a time: $RUN/bitmig.sock for bitmig, $RUN/qmp.sock for
# anyone else (the test, an operator with qmp-bitmaps.py).

IMG=/images/disk.qcow2
RUN=/run/qemu
NODE=${BITMIG_QEMU_NODE:-disk0}
SIZE=${BITMIG_QEMU_DISK_SIZE:-1T}
QSD_PID=

log() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*" >&2; }

start_qsd() {
    # --daemonize: the parent exits once the sockets listen, so no wait loop is needed
    qemu-storage-daemon \
        --blockdev "driver=file,filename=$IMG,node-name=$NODE-file" \
        --blockdev "driver=qcow2,file=$NODE-file,node-name=$NODE" \
        --chardev "socket,path=$RUN/qmp.sock,server=on,wait=off,id=mon0" \
        --monitor chardev=mon0 \
        --chardev "socket,path=$RUN/bitmig.sock,server=on,wait=off,id=mon1" \
        --monitor chardev=mon1 \
        --pidfile "$RUN/qsd.pid" --daemonize
    QSD_PID=$(cat "$RUN/qsd.pid")
    log "qemu-storage-daemon $QSD_PID: node $NODE on $IMG ($SIZE)"
}

stop_qsd() {
    # SIGTERM: qemu-storage-daemon closes the image, which stores persistent bitmaps in it
    if [[ -n $QSD_PID ]] && kill "$QSD_PID" 2>/dev/null; then
        tail --pid="$QSD_PID" -f /dev/null
        log "qemu-storage-daemon stopped; bitmaps in the image:"
        qemu-img info --output=json "$IMG" >&2 || true
    fi
    QSD_PID=
}

mkdir -p "$(dirname "$IMG")" "$RUN"
