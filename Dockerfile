# syntax=docker/dockerfile:1
# konpro-bridge image (issue #6): multi-stage, small, non-root, self-checking, spool on a volume.

# Build stage: install the bridge and its dependencies into a virtualenv. Any compiler needed
# for a dependency without a wheel for this platform stays in this stage.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/konpro-bridge
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN /opt/konpro-bridge/bin/pip install .
# The running bridge needs no installer.
RUN /opt/konpro-bridge/bin/python -m pip uninstall --yes pip setuptools

# Final stage: the virtualenv only (copied, so no wheel files linger in a layer), no build
# tools, a numeric non-root user (so that Kubernetes' runAsNonRoot can verify it).
FROM python:3.11-slim
ARG UID=10001
RUN groupadd --system --gid ${UID} bridge \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /nonexistent --shell /usr/sbin/nologin bridge \
 && mkdir -p /etc/konpro-bridge /var/lib/konpro-bridge/spool \
 && chown ${UID}:${UID} /var/lib/konpro-bridge/spool
COPY --from=build /opt/konpro-bridge /opt/konpro-bridge
COPY config.example.toml /etc/konpro-bridge/config.toml
ENV PATH=/opt/konpro-bridge/bin:$PATH \
    KONPRO_BRIDGE_CONFIG=/etc/konpro-bridge/config.toml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ${UID}:${UID}
VOLUME ["/var/lib/konpro-bridge/spool"]
EXPOSE 8080
STOPSIGNAL SIGTERM
# The same settings as the daemon (config file and environment), so a changed port is followed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["konpro-bridge", "healthcheck"]
ENTRYPOINT ["konpro-bridge"]
CMD ["run"]
