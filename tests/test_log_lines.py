"""Log lines reach the stream whole and in order, by the end of the loop turn they were logged
in, in writes of whole lines that a pipe shared by several workers keeps whole; none is lost at
exit."""

from __future__ import annotations

import asyncio
import io
import logging
import select
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from bridge.config import LogSettings
from bridge.events import claimed_event_id
from bridge.logs import LineWriter, configure_logging
from tests.support.deliveries import JSON, envelope, post_status
from tests.support.harness import AMQP_URL, BridgeFactory
from tests.support.observing import seen
from tests.support.process import BridgeProcess


class RecordingStream(io.BytesIO):
    """A binary stream that keeps each ``write`` apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override] # bytes are all we write
        self.writes.append(bytes(data))
        return super().write(data)


async def test_lines_logged_in_one_loop_turn_are_written_together_at_its_end() -> None:
    out = RecordingStream()
    writer = LineWriter(out)
    writer.write_line(b"one\n")
    writer.write_line(b"two\n")
    assert out.writes == []  # the turn is not over
    await asyncio.sleep(0)
    assert out.writes == [b"one\ntwo\n"]
    writer.write_line(b"three\n")
    await asyncio.sleep(0)
    assert out.writes == [b"one\ntwo\n", b"three\n"]


def test_a_line_logged_where_no_loop_runs_is_written_at_once() -> None:
    out = RecordingStream()
    LineWriter(out).write_line(b"start-up\n")
    assert out.writes == [b"start-up\n"]


async def test_each_write_is_whole_lines_that_a_pipe_keeps_whole() -> None:
    out = RecordingStream()
    writer = LineWriter(out)
    lines = [b"%04d " % i + b"x" * 95 + b"\n" for i in range(200)]  # 20,000 bytes
    long_line = b"y" * (2 * select.PIPE_BUF) + b"\n"
    for line in [*lines, long_line]:
        writer.write_line(line)
    await asyncio.sleep(0)
    assert b"".join(out.writes) == b"".join([*lines, long_line])
    assert all(write.endswith(b"\n") for write in out.writes)
    assert out.writes[-1] == long_line  # too long for one atomic write: alone, never split
    assert all(len(write) <= select.PIPE_BUF for write in out.writes[:-1])
    assert len(out.writes) < 10  # not a write a line


async def test_the_libraries_lines_keep_their_place_among_the_bridges(tmp_path: Path) -> None:
    path = tmp_path / "bridge.log"
    with path.open("w") as stream:
        configure_logging(LogSettings(level="info", format="json"), stream=stream)
        try:
            structlog.get_logger("test").info("first")
            logging.getLogger("aiohttp.server").warning("second")
            structlog.get_logger("test").info("third")
            await asyncio.sleep(0)
        finally:
            structlog.reset_defaults()
            logging.getLogger().handlers.clear()
    events = [orjson.loads(line)["event"] for line in path.read_text().splitlines()]
    assert events == ["first", "second", "third"]


LOGS_IN_ITS_LAST_TURN = """
import asyncio, logging, os, structlog
from bridge.config import LogSettings
from bridge.logs import configure_logging
configure_logging(LogSettings(level="info", format="json"))
loop = asyncio.new_event_loop()
def last_turn():
    structlog.get_logger("test").info("last.words")
    loop.stop()
loop.call_soon(last_turn)
loop.run_forever()
"""
"""A program whose loop stops in the turn that logged a line: the flush booked for the end of
that turn never runs."""


def events_logged_by(program: str) -> list[str]:
    ran = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, check=True, timeout=60
    )
    return [orjson.loads(line)["event"] for line in ran.stderr.splitlines()]


def test_lines_still_waiting_when_the_process_exits_are_written() -> None:
    assert events_logged_by(LOGS_IN_ITS_LAST_TURN) == ["last.words"]


def test_logging_shutdown_writes_the_lines_still_waiting() -> None:
    # A forked worker ends with os._exit, without atexit: it calls logging.shutdown() instead.
    program = LOGS_IN_ITS_LAST_TURN + (
        "logging.shutdown()  # what a worker does on its way out (bridge.workers)\n"
        "os._exit(0)  # how a forked process ends: no atexit\n"
    )
    assert events_logged_by(program) == ["last.words"]


async def test_off_a_terminal_the_default_format_is_one_json_object_per_line(
    tmp_path: Path, exchange_name: str
) -> None:
    # log.format = "auto" (the default), stderr a pipe as in a container: JSON, for collectors.
    sections: dict[str, dict[str, object]] = {
        "amqp": {"url": AMQP_URL, "exchange": exchange_name},
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": False},
    }
    async with BridgeProcess(tmp_path, sections) as bridge:
        pass

    lines = bridge.log().splitlines()
    assert len(lines) >= 3
    events = [orjson.loads(line)["event"] for line in lines]
    assert "bridge.listening" in events


@pytest.mark.parametrize(
    "claimed", ["e" * 201, "evt_1\nwebhook.accepted forged=1", "evt\x1b[2J"], ids=repr
)
def test_a_refused_deliverys_claimed_event_id_is_logged_only_if_the_bridge_would_take_it(
    claimed: str,
) -> None:
    """The ``webhook.rejected`` line names the event id the delivery claims (unsigned, from
    whoever sent it): one too long or not printable (a newline forging a log line in the console
    format, a terminal escape) is left out, not copied into the log."""
    assert claimed_event_id({"KonPro-Event-Id": claimed}) is None
    assert claimed_event_id({"KonPro-Event-Id": "evt_1"}) == "evt_1"


async def test_a_delivery_refused_503_once_read_is_named_in_its_log_line(
    start_bridge_cut_off: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """A 503 for a delivery the bridge had read (the spool full) names its message id, to match
    it with KonPro's list of failed deliveries; a 4xx names who sent it (``remote``)."""
    async with start_bridge_cut_off(spool={"max_events": 1}) as bridge:
        url = bridge.webhook_url
        assert await post_status(http, url, envelope("v_fills_the_spool")) == 202
        with capture_logs() as logs:
            headers = {**JSON, "KonPro-Event-Id": "evt_refused_503"}
            assert await post_status(http, url, envelope("v_refused"), headers) == 503
            assert await post_status(http, url, b"not json") == 400
    [refused] = seen(logs, "webhook.refused")
    assert (refused["message_id"], refused["event_type"]) == (
        "evt_refused_503",
        "avatar_video.success",
    )
    [rejected] = seen(logs, "webhook.rejected")
    assert rejected["remote"] == "127.0.0.1"
