"""The bridge as a separate process, started the way an operator starts it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple, Self

import aiohttp


class Ran(NamedTuple):
    """How a ``konpro-bridge`` command ended."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


NOBODY = 65534
CAN_SWITCH_USER = os.geteuid() == 0 and shutil.which("setpriv") is not None
"""Whether a test may run a command as ``NOBODY`` (``as_user``): root, with util-linux's
setpriv. Root may read and write anything, so permission errors need another user."""


async def start_command(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    output: int | IO[bytes] = asyncio.subprocess.PIPE,
    as_user: int | None = None,
) -> asyncio.subprocess.Process:
    """``python -m bridge ARGS`` as an operator runs it. ``KONPRO_BRIDGE_*`` variables of the
    test runner are left out: a test's settings come from its own file (and ``env``)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KONPRO_BRIDGE_")}
    switch_user = () if as_user is None else (
        "setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups"
    )  # fmt: skip
    return await asyncio.create_subprocess_exec(
        *switch_user,
        sys.executable,
        "-m",
        "bridge",
        *map(str, args),
        stdout=output,
        stderr=output,
        env={**clean, **(env or {})},
        cwd=cwd,
    )


async def run_command(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    as_user: int | None = None,
) -> Ran:
    """``python -m bridge ARGS`` run to its end."""
    process = await start_command(*args, env=env, cwd=cwd, as_user=as_user)
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A minimal TOML writer for test settings (strings, numbers, booleans, lists of strings)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class BridgeProcess:
    """``python -m bridge run --config <file>`` with its log captured to a file."""

    def __init__(self, workdir: Path, sections: dict[str, dict[str, Any]]) -> None:
        self.port = int(sections.get("server", {}).get("port") or free_port())
        sections = {
            **sections,
            "server": {"host": "127.0.0.1", "port": self.port, **sections.get("server", {})},
        }
        self.config = write_toml(workdir / "bridge.toml", sections)
        self.log_path = workdir / "bridge.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.webhook_url = self.url + sections["server"].get("webhook_path", "/webhooks/konpro")
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, *, wait_ready: bool = True, wait_listening: bool = True) -> None:
        with self.log_path.open("ab") as log:
            self.process = await start_command("run", "--config", self.config, output=log)
        if wait_listening:
            await self._wait_for("/readyz" if wait_ready else "/healthz")

    async def _wait_for(self, path: str, within: float = 15.0) -> None:
        async with aiohttp.ClientSession() as http, asyncio.timeout(within):
            while True:
                assert self.process is not None
                assert self.process.returncode is None, self.log()
                try:
                    async with http.get(self.url + path) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)

    def send(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, within: float = 20.0) -> int:
        assert self.process is not None
        async with asyncio.timeout(within):
            return await self.process.wait()

    async def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.returncode is not None:
            return self.process.returncode
        self.send(signal.SIGTERM)
        try:
            return await self.wait()
        except TimeoutError:
            self.process.kill()
            return await self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
