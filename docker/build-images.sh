#!/usr/bin/env bash
# Build everything offline-capable: base image (debootstrap, reused if present),
# wheels, then the bitmig image.
#
# Env:
#   BITMIG_BASE_IMAGE  base image name (default: bitmig-base:bookworm)
#   BITMIG_IMAGE       final image name (default: bitmig:latest)
#   (see build-base.sh / prepare-wheels.sh for their own knobs)
#
# With --qemu, also the QEMU variant for docker-compose.qemu.yml: the same image on a base
# that adds Debian's qemu-utils and qemu-system-common (qemu-img, qemu-storage-daemon):
#   BITMIG_QEMU_BASE_IMAGE (default: bitmig-base-qemu:bookworm)
#   BITMIG_QEMU_IMAGE      (default: bitmig-qemu:latest)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export BITMIG_BASE_IMAGE="${BITMIG_BASE_IMAGE:-bitmig-base:bookworm}"
IMAGE="${BITMIG_IMAGE:-bitmig:latest}"

now() { date +%s.%N; }
step() {   # step NAME CMD...
    local name=$1 t0 rc=0; shift
    printf '==> %s\n' "$name" >&2
    t0=$(now)
    "$@" || rc=$?
    printf '==> %s: %.1f s%s\n' "$name" "$(awk -v a="$t0" -v b="$(now)" 'BEGIN{print b-a}')" \
        "$( ((rc)) && echo " (FAILED, rc=$rc)")" >&2
    return "$rc"
}

cd "$ROOT"
T0=$(now)
step base-image   "$ROOT/docker/build-base.sh"
step wheels       "$ROOT/docker/prepare-wheels.sh"
step docker-build docker build --build-arg BASE_IMAGE="$BITMIG_BASE_IMAGE" -t "$IMAGE" "$ROOT"
if [[ "${1:-}" == --qemu ]]; then
    QBASE="${BITMIG_QEMU_BASE_IMAGE:-bitmig-base-qemu:bookworm}"
    QIMAGE="${BITMIG_QEMU_IMAGE:-bitmig-qemu:latest}"
    step qemu-base-image env BITMIG_BASE_IMAGE="$QBASE" \
        BITMIG_BASE_EXTRA=qemu-utils,qemu-system-common "$ROOT/docker/build-base.sh"
    step qemu-docker-build docker build --build-arg BASE_IMAGE="$QBASE" -t "$QIMAGE" "$ROOT"
fi
# the legacy builder leaves the build stage and the previous image dangling;
# drop only those (labelled in the Dockerfile), nothing else
docker image prune -f --filter label=bitmig.image >/dev/null || true
printf '==> total: %.1f s; %s = %s\n' "$(awk -v a="$T0" -v b="$(now)" 'BEGIN{print b-a}')" "$IMAGE" \
    "$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f MB", $1/1e6}')" >&2
