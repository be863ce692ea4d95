"""konpro-bridge: KonPro webhooks in over HTTP, out to RabbitMQ, confirmed."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("konpro-bridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
