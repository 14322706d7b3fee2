#!/usr/bin/env bash
# Fill docker/wheels/ with everything the image needs so `docker build` runs
# without network: binary wheels of the runtime dependencies for the image's
# Python (bookworm: CPython 3.11, x86_64 manylinux) plus a wheel of bitmig.
#
# Runtime dependencies are read from pyproject.toml [project].dependencies.
#
# Env:
#   PYTHON                host interpreter used to run pip (default: python3)
#   BITMIG_PY_VERSION     target Python version (default: 3.11)
#   BITMIG_WHEELS_CLEAN=1 empty docker/wheels/ first (default: keep, pip skips
#                         files it already has)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS="$ROOT/docker/wheels"
PY="${PYTHON:-python3}"
PYVER="${BITMIG_PY_VERSION:-3.11}"
FALLBACK_DEPS=("numpy" "msgpack")

log() { printf '[prepare-wheels] %s\n' "$*" >&2; }

cd "$ROOT"
[[ -f pyproject.toml ]] || { log "no pyproject.toml in $ROOT"; exit 1; }

# --- read name + runtime deps from pyproject.toml (single source of truth) ---
# Output: line 1 = project name, following lines = dependency specifiers.
if meta=$("$PY" - <<'PYEOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:          # Python < 3.11
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f).get("project", {})
if "name" not in project:
    sys.exit("pyproject.toml has no [project].name")
print(project["name"])
for dep in project.get("dependencies", []):
    print(dep)
PYEOF
); then
    mapfile -t lines <<<"$meta"
    NAME="${lines[0]}"
    DEPS=("${lines[@]:1}")
else
    NAME=bitmig
    DEPS=("${FALLBACK_DEPS[@]}")
    log "WARNING: could not parse pyproject.toml with tomllib/tomli; using fallback deps: ${DEPS[*]}"
fi

PYVER_NODOT="${PYVER//./}"
mkdir -p "$WHEELS"
if [[ "${BITMIG_WHEELS_CLEAN:-0}" == 1 ]]; then
    rm -f "$WHEELS"/*.whl
fi

# --- runtime dependencies: binary wheels for the target interpreter ----------
if ((${#DEPS[@]})); then
    log "downloading wheels for cp$PYVER_NODOT manylinux x86_64: ${DEPS[*]}"
    "$PY" -m pip download --disable-pip-version-check --quiet \
        --only-binary=:all: \
        --python-version "$PYVER" --implementation cp --abi "cp$PYVER_NODOT" --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 \
        -d "$WHEELS" "${DEPS[@]}"
else
    log "no runtime dependencies declared"
fi

# --- bitmig itself ----------------------------------------------------------
# drop older builds of the project so --find-links cannot pick a stale one
dist="${NAME//[-.]/_}"
rm -f "$WHEELS/$dist"-*.whl "$WHEELS/${dist,,}"-*.whl
log "building wheel for $NAME"
# setuptools builds in-tree (build/, *.egg-info): remove what this run creates
litter=()
for p in build "$dist.egg-info" "${dist,,}.egg-info" "src/$dist.egg-info"; do
    [[ -e $p ]] || litter+=("$p")
done
"$PY" -m pip wheel --disable-pip-version-check --quiet --no-deps -w "$WHEELS" "$ROOT"
if ((${#litter[@]})); then rm -rf "${litter[@]}"; fi

log "$(ls "$WHEELS"/*.whl | wc -l) wheels in docker/wheels ($(du -sh "$WHEELS" | cut -f1)):"
ls -1 "$WHEELS"/*.whl | sed 's|.*/|  |' >&2
