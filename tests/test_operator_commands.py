"""The operator's commands run as an operator runs them, as processes against a running bridge:
``tail``, ``send-test-event`` and ``healthcheck`` (the image's HEALTHCHECK): exit codes, what they
print, and what reaches the bus. What each command does, in detail, is in
``test_operator_tools.py``, called in-process."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bridge.app import Bridge
from bridge.samples import sample_body
from bridge.signatures import SignatureVerifier
from tests.support.harness import AMQP_URL, BridgeFactory, QueueFactory, drain, proxied_amqp_url
from tests.support.process import free_port, start_command, write_toml
from tests.support.tcp_proxy import TcpProxy

SECRET = "whsec_operator"


def cli_config(tmp_path: Path, exchange: str, **sections: dict[str, Any]) -> Path:
    data: dict[str, dict[str, Any]] = {
        "amqp": {"url": AMQP_URL, "exchange": exchange},
        "log": {"format": "json"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return write_toml(tmp_path / "cli.toml", data)


async def test_tail_json_shows_an_event_published_through_the_bridge(
    start_bridge: BridgeFactory,
    http: aiohttp.ClientSession,
    exchange_name: str,
    tmp_path: Path,
) -> None:
    config = cli_config(tmp_path, exchange_name)
    tail = await start_command(
        "tail", "--bind", "avatar_video.*", "--json", "--max-events", "1", "--duration", "20",
        "--config", config,
    )  # fmt: skip
    assert tail.stderr is not None
    async with start_bridge() as bridge:
        announced = await asyncio.wait_for(tail.stderr.readline(), 15)
        assert b"tailing" in announced
        body = sample_body("avatar_video.success")
        await _post(http, bridge, body, {"KonPro-Event-Id": "evt-tail"})
        out, _ = await asyncio.wait_for(tail.communicate(), 15)

    assert tail.returncode == 0
    [line] = out.decode().splitlines()
    record = orjson.loads(line)
    assert record["exchange"] == exchange_name
    assert record["routing_key"] == "avatar_video.success"
    assert record["message_id"] == "evt-tail"
    assert record["body"] == orjson.loads(body)
    assert record["timestamp"].endswith("Z")


async def test_send_test_event_is_accepted_and_verified_by_the_bridge(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, exchange_name: str, tmp_path: Path
) -> None:
    queue = await bind_queue("personalized_video")
    async with start_bridge(konpro={"webhook_secret": SECRET}) as bridge:
        config = cli_config(
            tmp_path,
            exchange_name,
            server={"port": bridge.port},
            konpro={"webhook_secret": SECRET},
        )
        send = await start_command("send-test-event", "personalized_video", "--config", config)
        out, err = await asyncio.wait_for(send.communicate(), 15)
        forged = await start_command(
            "send-test-event", "personalized_video", "--secret", "whsec_wrong", "--config", config
        )
        forged_out, _ = await asyncio.wait_for(forged.communicate(), 15)

    assert send.returncode == 0, err
    status, answer = out.decode().split(" ", 1)
    assert status == "200"
    assert orjson.loads(answer)["outcome"] == "published"
    assert forged.returncode == 1
    assert forged_out.decode().startswith("401 ")
    [message] = await drain(queue, expect=1)
    SignatureVerifier([SECRET], timestamp_tolerance=60).verify(message.body, message.headers)


async def test_send_test_event_exits_0_on_a_spooled_202_to_the_url_given(
    start_bridge_cut_off: BridgeFactory, exchange_name: str, tmp_path: Path
) -> None:
    async with start_bridge_cut_off() as bridge:
        config = cli_config(tmp_path, exchange_name, server={"port": free_port()})  # not there
        send = await start_command(
            "send-test-event", "avatar_video.fail", "--url", bridge.webhook_url, "--config", config
        )
        out, err = await asyncio.wait_for(send.communicate(), 15)

    assert send.returncode == 0, err
    assert out.decode().startswith("202 ")


async def test_an_unreachable_broker_is_one_line_without_the_password(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "cli.toml", {"amqp": {"url": "amqp://guest:s3cr3t-pw@127.0.0.1:1/"}}
    )

    tail = await start_command("tail", "--duration", "5", "--config", config)
    out, err = await asyncio.wait_for(tail.communicate(), 15)

    assert tail.returncode == 1
    assert b"konpro-bridge: cannot tail the broker:" in err
    assert b"s3cr3t-pw" not in err + out


async def _post(
    http: aiohttp.ClientSession, bridge: Bridge, body: bytes, headers: dict[str, str]
) -> None:
    url = bridge.webhook_url
    headers = {"Content-Type": "application/json", **headers}
    async with http.post(url, data=body, headers=headers) as response:
        assert response.status == 200


async def test_healthcheck_follows_the_configured_port_and_says_why_it_fails(
    start_bridge: BridgeFactory, exchange_name: str, tmp_path: Path
) -> None:
    async with start_bridge() as bridge:
        port = bridge.port
        server = {"host": "0.0.0.0", "port": port}  # noqa: S104 - reached over loopback
        config = cli_config(tmp_path, exchange_name, server=server)
        for args in (("healthcheck",), ("healthcheck", "--ready")):
            check = await start_command(*args, "--config", config)
            out, _ = await check.communicate()
            assert (check.returncode, b" 200 " in out) == (0, True), args

    check = await start_command("healthcheck", "--config", config)  # the bridge has stopped
    _, err = await check.communicate()
    assert check.returncode == 1
    assert f"127.0.0.1:{port}/healthz: not answering".encode() in err


@pytest.mark.parametrize("count", ["0", "-1", "x"])
async def test_tail_refuses_a_count_of_events_it_could_never_reach(count: str) -> None:
    """``--max-events 0`` ran until ``--duration`` ended, or for ever."""
    tail = await start_command("tail", "--max-events", count)
    _, err = await tail.communicate()
    assert tail.returncode == 2
    assert f"argument --max-events: must be a whole number above 0, not '{count}'" in err.decode()


def can_listen_on_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "host",
    [
        pytest.param(
            "::",
            marks=pytest.mark.skipif(not can_listen_on_ipv6(), reason="no IPv6 on this host"),
        ),
        "",
    ],
    ids=["IPv6 wildcard", "every address"],
)
async def test_a_bridge_on_a_wildcard_address_answers_where_it_says_it_listens(
    host: str,
    start_bridge: BridgeFactory,
    http: aiohttp.ClientSession,
    exchange_name: str,
    tmp_path: Path,
) -> None:
    """``::`` takes IPv6 alone (asyncio sets ``IPV6_V6ONLY``): the bridge said it listened on
    127.0.0.1, where ``healthcheck`` (the image's HEALTHCHECK) and ``send-test-event`` were
    refused. It is reached over ``[::1]``; ``""`` listens on every address of both."""
    async with start_bridge(server={"host": host}) as bridge:
        async with http.get(bridge.url + "/healthz") as response:
            assert response.status == 200
        config = cli_config(tmp_path, exchange_name, server={"host": host, "port": bridge.port})
        check = await start_command("healthcheck", "--config", config)
        _, err = await check.communicate()

    assert check.returncode == 0, err


async def test_healthcheck_ready_fails_with_the_reason_while_the_broker_is_unreachable(
    start_bridge: BridgeFactory, broker_proxy: TcpProxy, exchange_name: str, tmp_path: Path
) -> None:
    await broker_proxy.cut()
    async with start_bridge(
        wait_ready=False, amqp={"url": proxied_amqp_url(broker_proxy)}
    ) as bridge:
        port = bridge.port
        config = cli_config(tmp_path, exchange_name, server={"host": "127.0.0.1", "port": port})
        alive = await start_command("healthcheck", "--config", config)
        ready = await start_command("healthcheck", "--ready", "--config", config)
        _, err = await ready.communicate()
        assert (await alive.wait(), ready.returncode) == (0, 1)
        assert b"503" in err
        assert b"cannot connect to the broker" in err
