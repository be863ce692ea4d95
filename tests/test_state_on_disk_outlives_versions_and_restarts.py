"""The spool and the stored secret outlive versions, restarts and operators' mishaps: what an
older version wrote is forwarded, a damaged row or a half-written secret is told for what it is,
and a start right after a kill waits for the spools its predecessors still hold."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from pydantic import SecretStr
from structlog.testing import capture_logs

from bridge.config import KonProSettings, ReconcileSettings, SpoolSettings
from bridge.events import Delivery, body_digest, publishable
from bridge.konpro import KonProClient
from bridge.reconcile import Reconciler
from bridge.secret_file import (
    ENDPOINT_FILE_NAME,
    SECRET_FILE_NAME,
    StoredSecret,
    load_stored,
    store_secret,
)
from bridge.spool import FILE_NAME, SCHEMA_VERSION, Spool, SpoolUnusable
from tests.fake_konpro import FakeKonPro, WebhookReceiver
from tests.support.deliveries import envelope, post_status
from tests.support.harness import (
    BridgeFactory,
    QueueFactory,
    drain,
    process_sections,
    proxied_amqp_url,
)
from tests.support.process import BridgeProcess, run_command, write_toml
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

pytest_plugins = ("tests.fake_konpro",)


def _old_spool(directory: Path, rows: list[tuple[str, str, bytes, dict[str, str], float]]) -> None:
    """A spool as the bridge's first versions wrote it: no ``parked`` column."""
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(directory / FILE_NAME)) as old:
        old.execute("PRAGMA journal_mode=WAL")
        old.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, event_type TEXT NOT NULL,"
            " message_id TEXT NOT NULL, body BLOB NOT NULL, headers TEXT NOT NULL,"
            " received_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)"
        )
        old.executemany(
            "INSERT INTO events (event_type, message_id, body, headers, received_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [(t, m, b, orjson.dumps(h).decode(), r) for t, m, b, h, r in rows],
        )
        old.commit()


async def test_an_event_id_older_versions_spooled_holds_up_no_event_behind_it(
    tmp_path: Path, start_bridge: BridgeFactory, bind_queue: QueueFactory
) -> None:
    """Older versions took event ids of up to 200 characters, which may be more than the 255
    bytes of an AMQP message id: such a spooled event is published under its body's digest
    (what the bridge uses without an event id), said, and the events behind it go on."""
    long_id = "é" * 200  # 400 bytes in UTF-8, accepted before 86d2d31
    _old_spool(
        tmp_path / "spool",
        [
            ("avatar_video.success", long_id, envelope("v1"), {"KonPro-Event-Id": long_id}, 1.7e9),
            ("avatar_video.success", "evt_2", envelope("v2"), {"KonPro-Event-Id": "evt_2"}, 1.7e9),
        ],
    )
    queue = await bind_queue()
    with capture_logs() as logs:
        async with start_bridge():
            messages = await drain(queue, expect=2, within=8.0)
    assert [m.message_id for m in messages] == [body_digest(envelope("v1")), "evt_2"]
    assert messages[0].headers == {"KonPro-Event-Id": long_id}  # 400 bytes: a header holds it
    [adjusted] = [line for line in logs if line["event"] == "spool.event_adjusted"]
    assert adjusted["changes"] == [
        "message id longer than AMQP's 255 bytes: the body's digest instead"
    ]


@contextlib.asynccontextmanager
async def _reconciler(fake: FakeKonPro, url: str, spool: Path):  # type: ignore[no-untyped-def]
    """The daemon's reconciler (repair mode, no secret configured) with test-sized timings."""
    client = KonProClient(
        fake.url, SecretStr(fake.api_key), timeout=2.0, max_attempts=2, backoff_base=0.01
    )
    konpro = KonProSettings(api_url=fake.url, api_key=SecretStr(fake.api_key), public_url=url)
    schedule = ReconcileSettings.model_construct(interval=0.1, max_backoff=0.3, mode="repair")
    try:
        yield Reconciler(client, konpro, schedule, spool)
    finally:
        await client.close()


@pytest.mark.parametrize("damage", ["deleted", "blank"])
async def test_a_stored_endpoint_id_without_its_secret_is_not_reported_ok(
    damage: str,
    fake_konpro: FakeKonPro,
    webhook_receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    """The endpoint file alone (a backup that left out the secret, an operator who removed a
    leaked one) is no stored secret: not ``ok`` while signatures go unchecked."""
    fake_konpro.list_secrets = False
    spool = tmp_path / "spool"
    async with _reconciler(fake_konpro, webhook_receiver.url, spool) as reconciler:
        assert (await reconciler.run_once()).kind == "added"
    assert (spool / ENDPOINT_FILE_NAME).exists()
    if damage == "deleted":
        (spool / SECRET_FILE_NAME).unlink()
    else:
        (spool / SECRET_FILE_NAME).write_text("\r\n")

    async with _reconciler(fake_konpro, webhook_receiver.url, spool) as restarted:
        result = await restarted.run_once()

    assert result.kind == "error", (result.kind, result.error)
    assert "konpro.webhook_secret" in (result.error or "")


async def test_a_secret_stored_without_its_endpoint_id_is_not_called_another_endpoints(
    fake_konpro: FakeKonPro,
    webhook_receiver: WebhookReceiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A secret whose endpoint id was not written after it (a full disk, a kill between the
    two writes) is not called another endpoint's, run after run, while it is the right one."""
    from bridge import secret_file  # noqa: PLC0415

    fake_konpro.list_secrets = False
    spool = tmp_path / "spool"
    async with _reconciler(fake_konpro, webhook_receiver.url, spool) as reconciler:
        assert (await reconciler.run_once()).kind == "added"
        fake_konpro.endpoints.clear()  # deleted in the dashboard: the next run adds it again

        real_write = secret_file._write_privately

        def endpoint_write_fails(directory: Path, name: str, text: str) -> Path:
            if name == ENDPOINT_FILE_NAME:
                raise OSError(28, "No space left on device")
            return real_write(directory, name, text)

        monkeypatch.setattr(secret_file, "_write_privately", endpoint_write_fails)
        assert (await reconciler.run_once()).kind == "error"  # storing the secret failed
        monkeypatch.setattr(secret_file, "_write_privately", real_write)  # room again

        [kept] = fake_konpro.endpoints.values()
        assert secret_file.load_stored_secret(spool) == kept["secret"]
        result = await reconciler.run_once()

    assert (result.kind, result.error) == ("ok", None)


def test_a_copy_of_the_secret_a_killed_write_left_is_removed_by_the_next_store(
    tmp_path: Path,
) -> None:
    """A kill between writing the secret's temporary copy and renaming it leaves that copy: the
    next store removes it, so copies of old secrets do not pile up beside the spool. One written
    a moment ago may be another process's write in progress, and is left to it."""
    tmp_path.mkdir(exist_ok=True)
    left_by_a_kill = tmp_path / f".{SECRET_FILE_NAME}.k1ll3d"
    left_by_a_kill.write_text("whsec_old\n")
    an_hour_ago = time.time() - 3600
    os.utime(left_by_a_kill, (an_hour_ago, an_hour_ago))
    being_written = tmp_path / f".{ENDPOINT_FILE_NAME}.wr1t1ng"
    being_written.write_text("")

    store_secret(tmp_path, "whsec_new", "ep_1")

    assert not left_by_a_kill.exists()
    assert being_written.exists()
    assert load_stored(tmp_path) == StoredSecret("whsec_new", "ep_1")


NOW = 1_800_000_000.0


async def _fill_with_a_damaged_row(directory: Path) -> None:
    async with await Spool.open(SpoolSettings(path=directory)) as spool:
        for n in range(3):
            event_id = f"evt_{n}"
            await spool.append(
                Delivery(
                    "avatar_video.success",
                    envelope(f"v{n}"),
                    event_id,
                    {"KonPro-Event-Id": event_id},
                )
            )
    with contextlib.closing(sqlite3.connect(directory / FILE_NAME)) as db:
        db.execute(
            "UPDATE events SET headers = ? WHERE message_id = 'evt_1'",
            ('{"KonPro-Event-Id": "evt_1',),
        )
        db.commit()


async def test_one_unreadable_row_does_not_hold_up_every_other_event_in_the_spool(
    tmp_path: Path, start_bridge: BridgeFactory, bind_queue: QueueFactory
) -> None:
    """One row whose headers cannot be read (a damaged page, a row recovered from a corrupt
    file) holds up nothing: it is forwarded without them, and that is said, naming the worker
    whose spool it is (the line is logged in the spool's own thread)."""
    await _fill_with_a_damaged_row(tmp_path / "spool")
    queue = await bind_queue()
    with (
        capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs,
        structlog.contextvars.bound_contextvars(worker=0),
    ):
        async with start_bridge():
            messages = await drain(queue, expect=3, within=6.0)
    assert sorted(m.message_id for m in messages) == ["evt_0", "evt_1", "evt_2"]
    [unreadable] = [line for line in logs if line["event"] == "spool.headers_unreadable"]
    assert (unreadable["message_id"], unreadable.get("worker")) == ("evt_1", 0)


async def test_spool_drain_of_a_spool_with_an_unreadable_row_ends_without_a_traceback(
    tmp_path: Path, exchange_name: str
) -> None:
    """``spool drain`` over the same spool drains every event, and says which headers it could
    not read."""
    await _fill_with_a_damaged_row(tmp_path / "spool")
    config = write_toml(
        tmp_path / "c.toml",
        {
            "amqp": {"url": "amqp://guest:guest@127.0.0.1:5672/", "exchange": exchange_name},
            "spool": {"path": str(tmp_path / "spool")},
            "reconcile": {"enabled": False},
        },
    )

    ran = await run_command("spool", "drain", "--wait", "5", "--config", config)

    assert "Traceback" not in ran.stderr, ran.stderr[-800:]
    assert "drained 3 events" in ran.stdout, (ran.code, ran.stdout, ran.stderr[-400:])
    assert "spool.headers_unreadable" in ran.stderr


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _lines(log: str, event: str) -> list[dict[str, Any]]:
    """The lines of one event in a JSON log."""
    lines = (orjson.loads(line) for line in log.splitlines() if line.startswith("{"))
    return [line for line in lines if line["event"] == event]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in {"Z", "X"}


async def test_a_start_right_after_the_supervisor_was_killed_waits_for_its_workers_spools(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, bind_queue: QueueFactory
) -> None:
    """A supervisor killed outright takes its workers with it, but they stop gracefully, holding
    their spools meanwhile: a start made at once (a process manager's) waits for them, saying
    so, rather than exit 1; and the deliveries the old workers answered reach the bus."""
    queue = await bind_queue()
    sections = process_sections(
        tmp_path,
        exchange_name,
        amqp_url=proxied_amqp_url(broker_proxy),
        amqp={"reconnect_interval": 0.2, "publish_timeout": 8.0},
        server={"workers": 2, "shutdown_timeout": 4.0},
    )
    old = BridgeProcess(tmp_path, sections)
    await old.start()
    assert old.process is not None
    workers = _children(old.process.pid)
    (tmp_path / "again").mkdir()
    new = BridgeProcess(tmp_path / "again", {**sections, "server": {
        **sections["server"], "port": old.port}})  # fmt: skip
    bodies = [envelope(f"v{n}-{tmp_path.name}") for n in range(4)]
    try:
        broker_proxy.hold()  # publishes wait in the proxy: their confirms are due
        before = broker_proxy.sent_upstream
        async with aiohttp.ClientSession() as http:
            posting = [
                asyncio.create_task(post_status(http, old.webhook_url, body)) for body in bodies
            ]  # on one connection or several: some worker holds one
            await eventually(lambda: broker_proxy.sent_upstream - before >= len(bodies[0]))
            old.send(signal.SIGKILL)  # a publish is in the proxy: its worker waits for it
            await old.wait()
            await new.start(wait_ready=False, wait_listening=False)
            await eventually(lambda: bool(_lines(new.log(), "spool.locked_at_start")), within=15)
            broker_proxy.release()
            waiting = _lines(new.log(), "spool.locked_at_start")[0]["worker"]

            def started_when_free() -> bool:  # the worker that waited, not only the other one
                assert new.process is not None
                assert new.process.returncode is None, new.log()[-2000:]  # it did not give up
                listening = _lines(new.log(), "bridge.listening")
                return any(line["worker"] == waiting for line in listening)

            await eventually(started_when_free, within=30)
            answers = await asyncio.gather(*posting, return_exceptions=True)

        # A delivery the old workers had not begun to read when they stopped may have been cut
        # off (KonPro retries it); every one answered 2xx, at least the one held, reaches the
        # bus: confirmed then, or spooled (202) and forwarded by the new start.
        answered = [b for b, answer in zip(bodies, answers, strict=True) if answer in (200, 202)]
        assert answered, answers
        assert all(isinstance(a, aiohttp.ClientError) or a in (200, 202) for a in answers), answers
        arrived: set[bytes] = set()

        async def all_answered_arrived() -> bool:
            while (message := await queue.get(fail=False)) is not None:
                await message.ack()
                arrived.add(message.body)
            return set(answered) <= arrived

        await eventually(all_answered_arrived, within=30)
    finally:
        broker_proxy.release()
        await new.stop()
        for pid in filter(_alive, workers):  # the orphans this test made, by their ids
            os.kill(pid, signal.SIGKILL)


async def test_a_spool_written_by_a_newer_version_is_refused_not_misread(tmp_path: Path) -> None:
    """A downgrade: the spool's schema says a newer version wrote it. Opened anyway, its rows
    could be misread, or every event appended to it fail: it is refused, saying what to do."""
    spool_dir = tmp_path / "spool"
    async with await Spool.open(SpoolSettings(path=spool_dir)):
        pass
    with contextlib.closing(sqlite3.connect(spool_dir / FILE_NAME)) as db:
        db.execute("PRAGMA user_version = 99")

    for exclusive in (True, False):  # the daemon and spool drain; spool status
        with pytest.raises(SpoolUnusable, match="written by a newer version of the bridge"):
            await Spool.open(SpoolSettings(path=spool_dir), exclusive=exclusive)


async def test_a_spool_of_an_older_schema_is_brought_up_to_date(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    _old_spool(spool_dir, [("avatar_video.success", "evt_1", b"{}", {}, 1.0)])

    async with await Spool.open(SpoolSettings(path=spool_dir)) as spool:
        assert spool.depth == 1
    with contextlib.closing(sqlite3.connect(spool_dir / FILE_NAME)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_a_header_older_versions_spooled_too_large_for_amqp_is_left_out() -> None:
    """Before headers were bounded, a signature header of a few kilobytes could be spooled: the
    event goes on without it, rather than be refused at every try."""
    spooled = Delivery("avatar_video.success", b"{}", "evt_1", {"KonPro-Signature": "0" * 600})

    adjusted, changes = publishable(spooled)

    assert (adjusted.message_id, adjusted.headers) == ("evt_1", {})
    assert changes == ["header KonPro-Signature over 512 bytes: left out"]


def test_a_secret_stored_before_the_spool_exists_makes_its_directory_private(
    tmp_path: Path,
) -> None:
    """`reconcile --once` may run before the daemon ever did, and so make spool.path itself.
    The spool then lives in that directory (its files are made with SQLite's default 0644):
    made 0700, as the spool makes it, the events and the secret stay the bridge user's."""
    spool = tmp_path / "var" / "spool"

    store_secret(spool, "whsec_" + "s" * 24, "e" * 32)

    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    assert stat.S_IMODE((spool / SECRET_FILE_NAME).stat().st_mode) == 0o600


def test_a_secret_that_cannot_be_stored_leaves_no_copy_behind(tmp_path: Path) -> None:
    """A write that fails half-way (here the rename: something else holds the name) removes
    its temporary file: no stray copy of the signing secret is left beside the spool."""
    spool = tmp_path / "spool"
    (spool / SECRET_FILE_NAME).mkdir(parents=True)  # the rename over it fails

    with pytest.raises(IsADirectoryError):
        store_secret(spool, "whsec_" + "s" * 24, "e" * 32)

    assert sorted(path.name for path in spool.iterdir()) == [SECRET_FILE_NAME]
