# syntax=docker/dockerfile:1
# Build stage: compile wheels for the bridge and its dependencies.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Final stage: the wheels only, no build tools, a non-root user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin bridge \
 && mkdir -p /etc/konpro-bridge /var/lib/konpro-bridge/spool \
 && chown bridge /var/lib/konpro-bridge/spool
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels konpro-bridge && rm -rf /wheels
COPY config.example.toml /etc/konpro-bridge/config.toml
ENV KONPRO_BRIDGE_CONFIG=/etc/konpro-bridge/config.toml \
    PYTHONUNBUFFERED=1
USER bridge
VOLUME ["/var/lib/konpro-bridge/spool"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["konpro-bridge"]
CMD ["run"]
