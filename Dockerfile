# EscalationComms MCP gateway: runtime dependencies only, non-root, JSON logs.
#
#   docker build -t escalation-comms:latest .
#   docker build --build-arg EXTRAS=identity -t escalation-comms:latest .   # ACS with managed identity
#   docker run --rm -p 8078:8078 -e MCP_AUTH_TOKEN=... \
#     -e AZURE_COMMUNICATION_CONNECTION_STRING=... escalation-comms:latest
#
# The image serves streamable HTTP MCP at :8078/mcp plus /healthz, /readyz and /metrics.
# The SQLite store lives in /app/var (a volume); set DATABASE_URL=postgresql://... for replicas.

FROM python:3.11-slim

ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin app

# The project itself, without dev extras (no test or lint tools in the image). The sources are
# only needed to build the wheel, so they are removed in the same layer.
COPY pyproject.toml README.md /tmp/src/
COPY gateway/ /tmp/src/gateway/
COPY plugins/ /tmp/src/plugins/
RUN python -m pip install "/tmp/src${EXTRAS:+[$EXTRAS]}" && rm -rf /tmp/src

# Configuration and templates resolve against /app (config.yaml is found in the working directory).
WORKDIR /app
COPY config.yaml ./
COPY templates/ templates/
RUN mkdir -p var && chown app:app var

ENV PROFILE=prod \
    HOST=0.0.0.0 \
    PORT=8078

USER app
VOLUME ["/app/var"]
EXPOSE 8078

# slim has no curl: probe /healthz with the image's own Python (any non-2xx answer or no answer fails)
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8078'), timeout=4)"]

ENTRYPOINT ["escalation-comms"]
CMD ["serve"]
