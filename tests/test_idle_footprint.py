"""What start-up leaves behind: a sidecar's memory is paid for on every pod, and the garbage
collector must not stall every request in flight by walking it.

How much the bridge holds, and how long its collections take, is measured by the benchmark
(README, "Performance"), not asserted here; these tests hold the choices that keep both small.
"""

from __future__ import annotations

import asyncio
import platform
from pathlib import Path

import orjson
import pytest

from bridge.app import release_free_heap
from tests.support.harness import process_sections
from tests.support.process import BridgeProcess


def sections(tmp_path: Path, exchange: str) -> dict[str, dict[str, object]]:
    return process_sections(tmp_path, exchange, log={"level": "debug"})


async def test_the_running_bridge_maps_no_cxx_runtime(tmp_path: Path, exchange_name: str) -> None:
    """frozenlist's C++ build would map libstdc++ (1 MiB resident) for aiohttp's hook lists."""
    async with BridgeProcess(tmp_path, sections(tmp_path, exchange_name)) as bridge:
        assert bridge.process is not None
        maps = await asyncio.to_thread(Path(f"/proc/{bridge.process.pid}/maps").read_text)
    assert "aiohttp/_http_parser" in maps  # aiohttp's C parser is loaded: this is the server
    assert "libstdc++" not in maps


async def test_what_start_up_leaves_is_frozen_out_of_later_collections(
    tmp_path: Path, exchange_name: str
) -> None:
    async with BridgeProcess(tmp_path, sections(tmp_path, exchange_name)) as bridge:
        pass
    lines = [orjson.loads(line) for line in bridge.log().splitlines() if line.startswith("{")]
    settled = [line for line in lines if line["event"] == "bridge.memory_settled"]
    assert len(settled) == 1, bridge.log()
    assert settled[0]["frozen_objects"] > 10_000  # modules, classes, settings, the bridge's parts
    events = [line["event"] for line in lines]
    assert events.index("bridge.listening") < events.index("bridge.memory_settled")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_pages_go_back_to_the_system() -> None:
    freed, kept = [], []
    for _ in range(64):
        freed.append(bytearray(64 * 1024))  # from the heap: below mmap's threshold
        kept.append(bytearray(1024))  # in between, so that free() cannot shrink the heap itself
    del freed
    assert release_free_heap() is True
    del kept
