"""``konpro-bridge spool status|drain``: the operator's view of the spool, daemon running or not."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import tempfile
from pathlib import Path

import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractQueue

from bridge.config import SpoolSettings
from bridge.spool import Spool
from tests.support.harness import AMQP_URL, QueueFactory, drain, process_sections, proxied_amqp_url
from tests.support.process import (
    CAN_SWITCH_USER,
    NOBODY,
    BridgeProcess,
    run_command,
    start_command,
    write_toml,
)
from tests.support.tcp_proxy import TcpProxy


def sections(tmp_path: Path, exchange: str, amqp_url: str) -> dict[str, dict[str, object]]:
    return process_sections(tmp_path, exchange, amqp_url=amqp_url)


async def spool_some_events(
    tmp_path: Path, exchange: str, proxy: TcpProxy, http: aiohttp.ClientSession, count: int
) -> list[bytes]:
    """Runs a bridge whose broker link is cut, posts ``count`` events, stops it."""
    await proxy.cut()
    bodies = [
        orjson.dumps({"event_type": "avatar_video.fail", "event_data": {"video_id": f"v{n}"}})
        for n in range(count)
    ]
    bridge = BridgeProcess(tmp_path, sections(tmp_path, exchange, proxied_amqp_url(proxy)))
    await bridge.start(wait_ready=False)
    for body in bodies:
        headers = {"Content-Type": "application/json"}
        async with http.post(bridge.webhook_url, data=body, headers=headers) as r:
            assert r.status == 202
    assert await bridge.stop() == 0
    return bodies


async def test_status_of_a_spool_that_was_never_used_is_empty(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", {"spool": {"path": str(tmp_path / "none")}})
    code, out, _ = await run_command("spool", "status", "--json", "--config", str(config))
    assert code == 0
    empty = {
        "path": str(tmp_path / "none"),
        "depth": 0,
        "bytes": 0,
        "oldest_age": None,
        "parked": 0,
    }
    assert json.loads(out) == {**empty, "spools": [empty]}


async def test_status_then_drain_with_the_daemon_stopped_delivers_everything(
    tmp_path: Path,
    exchange_name: str,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    bodies = await spool_some_events(tmp_path, exchange_name, broker_proxy, http, count=7)
    config = write_toml(tmp_path / "direct.toml", sections(tmp_path, exchange_name, AMQP_URL))

    code, out, _ = await run_command("spool", "status", "--json", "--config", str(config))
    status = json.loads(out)
    assert (code, status["depth"], status["bytes"]) == (0, 7, sum(map(len, bodies)))
    assert status["oldest_age"] >= 0
    code, out, _ = await run_command("spool", "status", "--config", str(config))
    assert "depth:  7 events" in out

    code, out, err = await run_command("spool", "drain", "--config", str(config))
    assert code == 0, err
    assert "drained 7 events" in out
    assert [m.body for m in await drain(queue, expect=7)] == bodies  # original order
    code, out, _ = await run_command("spool", "status", "--json", "--config", str(config))
    assert json.loads(out)["depth"] == 0


async def test_status_reads_the_spool_of_a_running_daemon(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    # Where an operator looks during an outage: the daemon is up and holds the spool's lock.
    bodies = await spool_some_events(tmp_path, exchange_name, broker_proxy, http, count=3)
    cut = sections(tmp_path, exchange_name, proxied_amqp_url(broker_proxy))
    bridge = BridgeProcess(tmp_path, cut)
    await bridge.start(wait_ready=False)  # the broker is still away
    try:
        code, out, err = await run_command(
            "spool", "status", "--json", "--config", str(bridge.config)
        )
    finally:
        assert await bridge.stop() == 0

    assert code == 0, err
    assert (json.loads(out)["depth"], json.loads(out)["bytes"]) == (3, sum(map(len, bodies)))


async def test_drain_refuses_while_the_daemon_owns_the_spool(
    tmp_path: Path, exchange_name: str
) -> None:
    async with BridgeProcess(tmp_path, sections(tmp_path, exchange_name, AMQP_URL)) as bridge:
        code, _, err = await run_command("spool", "drain", "--config", str(bridge.config))
    assert code == 1
    assert "the daemon is running" in err


async def test_drain_without_a_broker_fails_clearly_and_keeps_the_events(
    tmp_path: Path,
    exchange_name: str,
    broker_proxy: TcpProxy,
    http: aiohttp.ClientSession,
) -> None:
    await spool_some_events(tmp_path, exchange_name, broker_proxy, http, count=2)
    config = write_toml(
        tmp_path / "cut.toml", sections(tmp_path, exchange_name, proxied_amqp_url(broker_proxy))
    )
    code, _, err = await run_command("spool", "drain", "--wait", "1", "--config", str(config))
    assert code == 1
    assert "no usable broker within 1 s (cannot connect to the broker: " in err
    code, out, _ = await run_command("spool", "status", "--json", "--config", str(config))
    assert json.loads(out)["depth"] == 2


async def test_drain_refused_by_the_broker_says_what_the_broker_said(tmp_path: Path) -> None:
    """Not "the broker did not answer": it did, refusing the login (or the vhost)."""
    wrong_password = AMQP_URL.replace("guest@", "not-the-password@")
    settings = sections(tmp_path, "drain-refused", wrong_password)
    config = write_toml(tmp_path / "bridge.toml", settings)
    await (await Spool.open(SpoolSettings(path=tmp_path / "spool"))).close()  # an empty one

    ran = await run_command("spool", "drain", "--wait", "3", "--config", config)

    assert ran.code == 1
    [line] = ran.stderr.strip().splitlines()[-1:]
    assert line.startswith("konpro-bridge: no usable broker within 3 s ("), line
    assert "ACCESS_REFUSED" in line, line


@pytest.mark.parametrize("spool_path", ["mistyped", "a file"])
async def test_drain_where_there_is_no_spool_says_so_and_makes_none(
    tmp_path: Path, spool_path: str
) -> None:
    """Before, a mistyped ``spool.path`` got an empty spool made there, and "drained 0 events"."""
    path = tmp_path / "spool"
    if spool_path == "a file":
        path.write_text("not a spool directory\n")
    config = write_toml(tmp_path / "bridge.toml", sections(tmp_path, "no-spool", AMQP_URL))

    ran = await run_command("spool", "drain", "--wait", "1", "--config", config)

    assert (ran.code, ran.stdout) == (1, "")
    assert ran.stderr == (
        f"konpro-bridge: no spool at {path}: nothing to drain (is spool.path right?)\n"
    )
    assert spool_path == "a file" or not path.exists()


@pytest.mark.skipif(not CAN_SWITCH_USER, reason="runs the command as nobody: root and setpriv")
async def test_drain_of_a_spool_the_user_may_not_open_is_one_clear_line() -> None:
    """As ``spool status`` says it: before, ``spool drain`` ended with a traceback."""
    with tempfile.TemporaryDirectory() as workdir:  # pytest's own is for root alone
        os.chmod(workdir, 0o755)  # noqa: S103 - nobody must reach the config inside
        root = Path(workdir)
        home = root / "konpro-bridge"  # /var/lib/konpro-bridge: the daemon's user's alone
        home.mkdir(mode=0o700)
        config = write_toml(root / "bridge.toml", {"spool": {"path": str(home / "spool")}})

        ran = await run_command(
            "spool", "drain", "--wait", "1", "--config", config, cwd=root, as_user=NOBODY
        )

    assert ran.code == 1
    assert ran.stderr == (
        f"konpro-bridge: cannot open the spool at {home / 'spool'}: "
        f"[Errno 13] Permission denied: '{home / 'spool'}'\n"
    )


async def test_drain_says_it_waits_30_s_for_the_broker_unless_told_otherwise() -> None:
    code, out, _ = await run_command("spool", "drain", "--help")
    assert code == 0
    assert "how long to wait for the broker (default: 30 s)" in " ".join(out.split())


@pytest.mark.skipif(not CAN_SWITCH_USER, reason="runs the command as nobody: root and setpriv")
async def test_status_of_a_spool_the_user_may_not_read_is_one_clear_line() -> None:
    with tempfile.TemporaryDirectory() as workdir:  # pytest's own is for root alone
        os.chmod(workdir, 0o755)  # noqa: S103 - nobody must reach the config inside
        root = Path(workdir)
        (root / "spool").mkdir(mode=0o700)  # the daemon's user's, not the operator's
        config = write_toml(root / "bridge.toml", {"spool": {"path": str(root / "spool")}})

        ran = await run_command("spool", "status", "--config", config, cwd=root, as_user=NOBODY)

    assert ran.code == 1
    assert ran.stderr.strip() == (
        f"konpro-bridge: cannot read the spool at {root / 'spool'}: "
        f"[Errno 13] Permission denied: '{root / 'spool' / 'spool.sqlite3'}'"
    )


async def test_a_corrupt_spool_file_is_one_clear_line_for_the_commands_and_the_daemon(
    tmp_path: Path, exchange_name: str
) -> None:
    config_sections = sections(tmp_path, exchange_name, AMQP_URL)
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "spool.sqlite3").write_bytes(b"not SQLite at all " * 300)
    config = str(write_toml(tmp_path / "c.toml", config_sections))
    for command in (("spool", "status"), ("spool", "drain", "--wait", "5")):
        code, _, err = await run_command(*command, "--config", config)
        assert (code, err.count("\n")) == (1, 1), err
        assert "spool.sqlite3 is not a usable spool (file is not a database)" in err

    bridge = BridgeProcess(tmp_path, config_sections)
    await bridge.start(wait_ready=False, wait_listening=False)
    assert await bridge.wait() == 1
    assert "is not a usable spool" in bridge.log()
    assert "Traceback" not in bridge.log()


async def drain_over_a_slow_link(
    tmp_path: Path, exchange: str, proxy: TcpProxy, queue: AbstractQueue
) -> tuple[asyncio.subprocess.Process, Path]:
    """Starts ``spool drain`` through ``proxy`` (its link slow: 50 ms a chunk unless already
    set), and returns once a few events reached ``queue``; the command, and its config file."""
    await proxy.restore()
    proxy.delay = proxy.delay or 0.05
    config = write_toml(
        tmp_path / "proxied.toml", sections(tmp_path, exchange, proxied_amqp_url(proxy))
    )
    command = await start_command("spool", "drain", "--config", str(config))
    async with asyncio.timeout(30):
        while ((await queue.declare()).message_count or 0) < 3:  # noqa: ASYNC110 - broker's
            await asyncio.sleep(0.05)
    return command, config


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
async def test_a_drain_stopped_part_way_says_how_far_it_got_and_what_stays(
    *,
    signum: signal.Signals,
    tmp_path: Path,
    exchange_name: str,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Run by hand over a slow link, a drain may be stopped: no traceback, but the count of
    what was drained, what happens to the rest, and an exit code that says it was stopped."""
    queue = await bind_queue("#")
    bodies = await spool_some_events(tmp_path, exchange_name, broker_proxy, http, count=30)
    command, config = await drain_over_a_slow_link(tmp_path, exchange_name, broker_proxy, queue)
    command.send_signal(signum)
    out, err = (part.decode() for part in await asyncio.wait_for(command.communicate(), 30))

    assert "Traceback" not in out + err
    assert command.returncode == 128 + signum
    assert f"stopped by {signum.name}: the rest stays in the spool" in err
    [drained] = [int(n) for n in re.findall(r"^drained (\d+) events$", out, re.MULTILINE)]
    broker_proxy.delay = 0.0
    code, _, stderr = await run_command("spool", "drain", "--config", str(config))
    assert code == 0, stderr
    received = {m.body for m in await drain(queue, expect=len(bodies), within=10)}
    assert received == set(bodies)  # the event in flight when it stopped may come twice
    assert drained < len(bodies)


async def test_a_second_ctrl_c_while_the_drain_closes_still_reports_what_was_drained(
    tmp_path: Path,
    exchange_name: str,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    """A second Ctrl-C, the usual answer to a command that does not stop at once, must not
    cut the cleanup short nor lose the count: what was drained plus what the next drain
    takes is the whole spool."""
    queue = await bind_queue("#")
    bodies = await spool_some_events(tmp_path, exchange_name, broker_proxy, http, count=30)
    broker_proxy.delay = 0.2  # slower still: the close takes a while too
    command, config = await drain_over_a_slow_link(tmp_path, exchange_name, broker_proxy, queue)
    command.send_signal(signal.SIGINT)
    await asyncio.sleep(0.15)  # the drain has stopped forwarding and is closing the link
    command.send_signal(signal.SIGINT)
    out, err = (part.decode() for part in await asyncio.wait_for(command.communicate(), 30))
    broker_proxy.delay = 0.0
    [first] = [int(n) for n in re.findall(r"^drained (\d+) events$", out, re.MULTILINE)]
    code, rest, stderr = await run_command("spool", "drain", "--config", str(config))
    assert code == 0, stderr
    [second] = [int(n) for n in re.findall(r"^drained (\d+) events$", rest, re.MULTILINE)]

    assert "Traceback" not in out + err
    assert first + second == len(bodies), (first, second, err)
