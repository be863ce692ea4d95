"""A sidecar's memory is paid for on every pod: the idle bridge carries nothing it does not use.

How much it holds is measured by the benchmark (README, "Performance"), not asserted here; these
tests hold the two choices that keep it small.
"""

from __future__ import annotations

import asyncio
import platform
from pathlib import Path

import pytest

from bridge.app import release_free_heap
from tests.conftest import AMQP_URL
from tests.support.process import BridgeProcess


async def test_the_running_bridge_maps_no_cxx_runtime(tmp_path: Path, exchange_name: str) -> None:
    """frozenlist's C++ build would map libstdc++ (1 MiB resident) for aiohttp's hook lists."""
    sections: dict[str, dict[str, object]] = {
        "amqp": {"url": AMQP_URL, "exchange": exchange_name},
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": False},
    }
    async with BridgeProcess(tmp_path, sections) as bridge:
        assert bridge.process is not None
        maps = await asyncio.to_thread(Path(f"/proc/{bridge.process.pid}/maps").read_text)
    assert "aiohttp/_http_parser" in maps  # aiohttp's C parser is loaded: this is the server
    assert "libstdc++" not in maps


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_pages_go_back_to_the_system() -> None:
    freed, kept = [], []
    for _ in range(64):
        freed.append(bytearray(64 * 1024))  # from the heap: below mmap's threshold
        kept.append(bytearray(1024))  # in between, so that free() cannot shrink the heap itself
    del freed
    assert release_free_heap() is True
    del kept
