# bitmig runtime image.
#
# The build needs no network: everything is installed from docker/wheels/,
# which docker/prepare-wheels.sh fills (bitmig wheel + numpy/msgpack wheels).
# On hosts without a registry, build the base with docker/build-base.sh and
# pass it in; docker/build-images.sh does all of it:
#   docker build --build-arg BASE_IMAGE=bitmig-base:bookworm -t bitmig:latest .
# The base must provide python3 (3.11) with the venv module and ensurepip.
ARG BASE_IMAGE=python:3.11-slim

# --- build stage: venv populated from local wheels only ----------------------
FROM ${BASE_IMAGE} AS build
LABEL bitmig.image=build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1
COPY docker/wheels/ /wheels/
RUN python3 -m venv /opt/bitmig \
 && /opt/bitmig/bin/pip install --no-index --find-links /wheels bitmig \
 && /opt/bitmig/bin/python -m pip uninstall -y -q pip setuptools \
 && find /opt/bitmig/lib/python3*/site-packages/numpy -depth -type d -name tests -exec rm -rf {} + \
 && /opt/bitmig/bin/python -c "import bitmig, numpy, msgpack"

# --- runtime stage: base + venv (no wheels, pip, setuptools, numpy tests) --
FROM ${BASE_IMAGE}
LABEL bitmig.image=runtime
COPY --from=build /opt/bitmig /opt/bitmig
ENV PATH=/opt/bitmig/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/bitmig \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8
# State, traces and runtime sockets. Runs as root by default so bind-mounted
# volumes and device/socket access need no uid mapping; an unprivileged
# "bitmig" user owning these dirs exists for `docker run --user bitmig`.
RUN mkdir -p /var/lib/bitmig /traces /run/bitmig \
 && (getent passwd bitmig >/dev/null \
     || useradd --uid 10001 --user-group --home-dir /var/lib/bitmig --no-create-home --shell /usr/sbin/nologin bitmig) \
 && chown bitmig:bitmig /var/lib/bitmig /traces /run/bitmig
ENTRYPOINT ["bitmig"]
CMD ["--help"]
