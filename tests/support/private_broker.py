"""A RabbitMQ node of the tests' own, for faults that would disturb the shared broker.

Raising a memory alarm blocks every publishing connection of a node, so it is done on a private
node on free ports, with its own data directory, stopped and removed afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.process import free_port


class PrivateBroker:
    def __init__(self) -> None:
        self.port = free_port()
        self.node = f"konpro-bridge-test-{os.getpid()}@localhost"
        self.base = Path(tempfile.mkdtemp(prefix="konpro-bridge-rabbit-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def config(self) -> str:
        """The node's ``rabbitmq.conf``."""
        return f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"

    def start(self) -> None:
        (self.base / "rabbitmq.conf").write_text(self.config())
        (self.base / "enabled_plugins").write_text("[].\n")
        shutil.chown(self.base, "rabbitmq", "rabbitmq")
        for child in self.base.iterdir():
            shutil.chown(child, "rabbitmq", "rabbitmq")
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
        }
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, timeout=60)
        self._await_startup(within=90)

    def _await_startup(self, within: float) -> None:
        # The node is unknown to the CLI until it has registered, so ask again until it answers.
        deadline = time.monotonic() + within
        while True:
            try:
                self.ctl("await_startup", "--timeout", "10", timeout=30)
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            else:
                return

    def ctl(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        )
        return result.stdout

    def add_user(
        self,
        name: str,
        password: str,
        *,
        configure: str = ".*",
        write: str = ".*",
        read: str = ".*",
    ) -> str:
        """Creates a user with these permissions on ``/`` (every one by default); returns its
        AMQP URL."""
        self.ctl("add_user", name, password)
        self.ctl("set_permissions", "-p", "/", name, configure, write, read)
        return f"amqp://{name}:{password}@127.0.0.1:{self.port}/"

    def raise_memory_alarm(self) -> None:
        self.ctl("set_vm_memory_high_watermark", "0.0000001")

    def clear_memory_alarm(self) -> None:
        self.ctl("set_vm_memory_high_watermark", "0.4")

    @contextmanager
    def max_message_size(self, size: int) -> Iterator[None]:
        """Messages over ``size`` bytes refused (PRECONDITION_FAILED) on channels opened meanwhile,
        as with ``max_message_size`` in rabbitmq.conf."""
        default = self.ctl("eval", "application:get_env(rabbit, max_message_size).")
        self.ctl("eval", f"application:set_env(rabbit, max_message_size, {size}).")
        try:
            yield
        finally:
            (previous,) = re.findall(r"\{ok,(\d+)\}", default)
            self.ctl("eval", f"application:set_env(rabbit, max_message_size, {previous}).")

    def close_connections(self, named: str, reason: str) -> int:
        """What a broker restart or an operator's ``rabbitmqctl close_connection`` does to the
        connections a client named: a Connection.Close (320 CONNECTION_FORCED) from the broker."""
        listing = self.ctl("list_connections", "--silent", "pid", "client_properties")
        pids = [line.split()[0] for line in listing.splitlines() if f'"{named}"' in line]
        for pid in pids:
            self.ctl("close_connection", pid, reason)
        return len(pids)

    def stop(self) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, "stop"], capture_output=True, timeout=60, check=False
        )
        shutil.rmtree(self.base, ignore_errors=True)


def can_run_a_private_broker() -> str | None:
    """Why a private node cannot be started here, or ``None`` when it can."""
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        return "rabbitmq-server is not installed"
    if os.geteuid() != 0:
        return "starting a RabbitMQ node needs root (it runs as the rabbitmq user)"
    return None
