"""konpro-bridge: KonPro webhooks in over HTTP, out to RabbitMQ, confirmed."""

import os
from importlib.metadata import PackageNotFoundError, version

# Before anything imports aiohttp: it keeps its start-up and shutdown hooks in frozenlist, whose
# C++ build maps libstdc++ (1 MiB resident for the life of the process) for lists that are read
# at most once a request. The pure-Python build, a documented switch of frozenlist, does the same.
os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")

try:
    __version__ = version("konpro-bridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
