# The OrderMesh image: every `ordermesh` command, e.g. `docker run IMAGE inventory run`.
#
#   docker build -t ordermesh .
#   docker compose up -d          (compose.yaml: Kafka, PostgreSQL and every service)
#
# BASE is any Debian-based image with Python 3.11+ and its venv module, as python3 on the
# PATH: the official python image (/usr/local/bin/python3) or a Debian one with
# python3-venv (/usr/bin/python3). docs/deploy.md has the details.
ARG BASE=python:3.11-slim-bookworm

# --- build: the wheel and a venv with it and its pinned dependencies ---------------------
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/ordermesh
# the dependencies first, from pyproject.toml alone: a change to the code reuses this layer
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && /opt/ordermesh/bin/pip install --only-binary=:all: -r requirements.txt
COPY README.md ./
COPY src ./src
RUN /opt/ordermesh/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/ordermesh/bin/pip install --no-deps /wheels/ordermesh-*.whl \
    && /opt/ordermesh/bin/pip check \
    && /opt/ordermesh/bin/pip uninstall --yes pip \
    && find /opt/ordermesh -name __pycache__ -prune -exec rm -rf {} +

# --- run: the venv on a clean base, as an unprivileged user -----------------------------
FROM ${BASE}
LABEL org.opencontainers.image.title="ordermesh" \
      org.opencontainers.image.description="Kafka order processing: inventory, tracker, analytics, API, DLQ"
RUN groupadd --system --gid 10001 ordermesh \
    && useradd --system --uid 10001 --gid ordermesh --home-dir /var/lib/ordermesh \
       --create-home --shell /usr/sbin/nologin ordermesh
COPY --from=build /opt/ordermesh /opt/ordermesh
ENV PATH=/opt/ordermesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ORDERMESH_DATA_DIR=/var/lib/ordermesh \
    ORDERMESH_METRICS_HOST=0.0.0.0 \
    ORDERMESH_METRICS_PORT=9100
USER ordermesh
WORKDIR /var/lib/ordermesh
# 9100: /metrics and /health of a consumer service; 8080: the API; 8090: the dashboard
EXPOSE 9100 8080 8090
# the service's own state (polling, partitions, nothing blocked), not only a live process;
# the API is asked on its port instead: `ordermesh health --url http://127.0.0.1:8080/health`
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["ordermesh", "health"]
ENTRYPOINT ["ordermesh"]
CMD ["--help"]
