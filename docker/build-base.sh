#!/usr/bin/env bash
# Build the local Debian bookworm base image used by the top-level Dockerfile.
#
# No container registry is reachable from the build hosts, so the base image is
# bootstrapped with debootstrap from the Debian mirror that the host's apt is
# already configured to use, then imported with `docker import`.
#
# Env:
#   BITMIG_BASE_IMAGE     image name (default: bitmig-base:bookworm)
#   BITMIG_DEBIAN_MIRROR  override the mirror URL (default: read from apt config)
#   BITMIG_REBUILD_BASE=1 rebuild even if the image already exists
#   BITMIG_BASE_EXTRA     extra Debian packages, comma-separated (the QEMU variant adds
#                         qemu-utils,qemu-system-common: docker/build-images.sh --qemu)
set -euo pipefail

IMAGE="${BITMIG_BASE_IMAGE:-bitmig-base:bookworm}"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates${BITMIG_BASE_EXTRA:+,$BITMIG_BASE_EXTRA}

log() { printf '[build-base] %s\n' "$*" >&2; }

if [[ "${BITMIG_REBUILD_BASE:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "reusing existing image $IMAGE ($(docker image inspect -f '{{.Id}}' "$IMAGE"))"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    log "debootstrap needs root"; exit 1
fi

# --- find the Debian mirror for $SUITE in the host's apt configuration -------
# deb822 (*.sources): first stanza with Types containing "deb" and Suites
# containing exactly "$SUITE"; its first URIs entry.
mirror_from_deb822() {
    awk -v suite="$SUITE" '
        function flush() {
            if (uris != "" && (" " suites " ") ~ (" " suite " ") && (" " types " ") ~ / deb /) {
                split(uris, u, " "); print u[1]; found = 1; exit
            }
            uris = ""; suites = ""; types = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        tolower($0) ~ /^uris:/   { sub(/^[^:]*:[ \t]*/, ""); uris = $0; next }
        tolower($0) ~ /^suites:/ { sub(/^[^:]*:[ \t]*/, ""); suites = $0; next }
        tolower($0) ~ /^types:/  { sub(/^[^:]*:[ \t]*/, ""); types = $0; next }
        END { if (!found) flush() }
    ' "$@" 2>/dev/null
}
# one-line format (*.list): "deb [options] URL bookworm component..."
mirror_from_list() {
    awk -v suite="$SUITE" '
        /^[ \t]*#/ { next }
        $1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            if ($(i + 1) == suite) { print $i; exit }
        }
    ' "$@" 2>/dev/null
}

find_mirror() {
    local f m
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        m=$(mirror_from_deb822 "$f" | head -n1)
        [[ -n $m ]] && { echo "$m"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        m=$(mirror_from_list "$f" | head -n1)
        [[ -n $m ]] && { echo "$m"; return 0; }
    done
    return 1
}

MIRROR="${BITMIG_DEBIAN_MIRROR:-}"
if [[ -z $MIRROR ]]; then
    MIRROR=$(find_mirror) || { log "no 'deb ... $SUITE' source found in /etc/apt; set BITMIG_DEBIAN_MIRROR"; exit 1; }
fi
MIRROR="${MIRROR%/}"
log "mirror: $MIRROR"

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends debootstrap >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y --no-install-recommends debootstrap
    }
fi

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/bitmig-base.XXXXXX")
ROOTFS="$WORK/rootfs"
cleanup() {
    # never leave proc/sys/dev mounts behind before deleting the tree
    local m
    for m in proc sys dev/pts dev; do
        mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m" || true
    done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

log "debootstrap --variant=minbase $SUITE (+$PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" \
    --components=main "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    log "debootstrap failed, last lines of log:"; tail -n 30 "$WORK/debootstrap.log" >&2
    [[ -f $ROOTFS/debootstrap/debootstrap.log ]] && tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2
    exit 1
}

# --- slim the rootfs ---------------------------------------------------------
# keep docs/man/locales out of any package installed later in the image, too
mkdir -p "$ROOTFS/etc/dpkg/dpkg.cfg.d"
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/01-bitmig-nodoc" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
cat >"$ROOTFS/etc/apt/apt.conf.d/01-bitmig-slim" <<'CFG'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
CFG
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old \
       "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/* \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/lintian "$ROOTFS"/usr/share/linda
find "$ROOTFS/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
find "$ROOTFS" -xdev -name '__pycache__' -type d -prune -exec rm -rf {} + 2>/dev/null || true
# docker provides these at run time
: >"$ROOTFS/etc/resolv.conf"
: >"$ROOTFS/etc/hostname"

log "importing as $IMAGE ($(du -sh --one-file-system "$ROOTFS" | cut -f1) rootfs)"
tar --numeric-owner --xattrs -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE +$PACKAGES" \
    - "$IMAGE" >/dev/null
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f MB", $1/1e6}'))"
