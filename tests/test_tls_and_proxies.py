"""The bridge in the networks a real deployment has: RabbitMQ over TLS, proxies, loopback checks.

A TLS node of the tests' own (a private CA made with openssl, a server certificate for
localhost and 127.0.0.1) stands for a managed broker; the shared broker is never reconfigured.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from bridge.app import Bridge
from bridge.config import Settings
from tests.fake_konpro import EVENT_TYPES, FakeKonPro
from tests.support.harness import AMQP_URL, BridgeFactory, proxied_amqp_url
from tests.support.private_broker import PrivateBroker, can_run_a_private_broker
from tests.support.process import free_port, run_command, start_command, write_toml
from tests.support.tcp_proxy import TcpProxy

pytest_plugins = ("tests.fake_konpro",)

README = Path(__file__).resolve().parent.parent / "README.md"


# -- a broker with TLS, and certificates ------------------------------------------------------


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path) -> tuple[Path, Path]:
    """A private CA: its certificate and key."""
    cert, key = directory / "ca.pem", directory / "ca.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=hunt-tls test CA", "-keyout", key, "-out", cert,
    )  # fmt: skip
    return cert, key


def make_signed(directory: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    """A certificate for ``san`` signed by ``ca``: its file and its key's."""
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={san}\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", key, "-out", csr,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-days", "2", "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    key.chmod(0o644)  # the broker reads it as the rabbitmq user
    return cert, key


class TlsBroker(PrivateBroker):
    """A private node with a TLS listener beside its plain one."""

    def __init__(self) -> None:
        super().__init__()
        self.node = f"konpro-bridge-test-tls-{os.getpid()}@localhost"
        self.tls_port = free_port()
        self.ca = self.base / "ca.pem"

    def config(self) -> str:
        ca = make_ca(self.base)
        cert, key = make_signed(self.base, "server", ca, "DNS:localhost,IP:127.0.0.1")
        return super().config() + (
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {ca[0]}\n"
            f"ssl_options.certfile = {cert}\n"
            f"ssl_options.keyfile = {key}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )

    def tls_url(self, host: str = "localhost", **query: str) -> str:
        params = "&".join(f"{key}={value}" for key, value in {"cafile": self.ca, **query}.items())
        return f"amqps://guest:guest@{host}:{self.tls_port}/?{params}"


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[TlsBroker]:
    if reason := can_run_a_private_broker():
        pytest.skip(reason)
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    broker = TlsBroker()
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


async def first_reason(bridge: Bridge, http: aiohttp.ClientSession) -> str:
    """What ``/readyz`` says once the first attempt to connect is over."""
    await asyncio.wait_for(bridge.publisher.until_first_attempt(), 15)
    async with http.get(bridge.url + "/readyz") as response:
        assert response.status == 503
        return await response.text()


# -- what an operator reads when TLS is set up wrongly ----------------------------------------


@pytest.mark.parametrize("missing", ["cafile", "certfile", "keyfile"])
async def test_a_tls_file_that_cannot_be_read_is_named_in_the_reason(
    missing: str, start_bridge: BridgeFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A CA or client certificate mounted at another path than ``amqp.url`` says: the reason
    names the parameter and the file (``ssl`` itself says only "No such file or directory")."""
    ca = make_ca(tmp_path)
    client = make_signed(tmp_path, "client", ca, "DNS:konpro-bridge")
    absent = tmp_path / f"mounted-elsewhere-{missing}.pem"
    files = {"cafile": ca[0], "certfile": client[0], "keyfile": client[1]}
    files[missing] = absent
    query = {"cafile": files["cafile"]}
    if missing != "cafile":
        query.update(certfile=files["certfile"], keyfile=files["keyfile"])
    url = "amqps://guest:guest@127.0.0.1:5671/?" + "&".join(f"{k}={v}" for k, v in query.items())

    async with start_bridge(wait_ready=False, amqp={"url": url}) as bridge:
        reason = await first_reason(bridge, http)

    assert str(absent) in reason, reason


async def test_plain_amqp_to_the_brokers_tls_port_says_the_port_wants_tls(
    tls_broker: TlsBroker, start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """``amqp://`` to the broker's TLS port: the reset is explained as a port that may expect
    TLS, not left to read as a network fault."""
    url = f"amqp://guest:guest@127.0.0.1:{tls_broker.tls_port}/"

    async with start_bridge(wait_ready=False, amqp={"url": url}) as bridge:
        reason = await first_reason(bridge, http)

    assert "TLS" in reason or "amqps://" in reason, reason


async def test_amqps_to_a_plain_port_says_the_port_does_not_speak_tls(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """``amqps://`` to the plain port: OpenSSL's "wrong version number" is explained as a port
    that answers without TLS."""
    plain = AMQP_URL.replace("amqp://", "amqps://", 1)

    async with start_bridge(wait_ready=False, amqp={"url": plain}) as bridge:
        reason = await first_reason(bridge, http)

    assert "TLS" in reason, reason


@pytest.mark.parametrize("value", ["false", "no", "off"])
async def test_no_verify_ssl_false_does_not_turn_certificate_checking_off(
    value: str,
    tls_broker: TlsBroker,
    start_bridge: BridgeFactory,
) -> None:
    """aiormq checks the certificate only while ``no_verify_ssl`` is absent or ``0``: a value
    written to mean "keep checking" must not turn the check off. It is refused."""
    url = f"amqps://guest:guest@localhost:{tls_broker.tls_port}/?no_verify_ssl={value}"
    try:
        Settings.model_validate({"amqp": {"url": url}})
    except ValueError:
        return  # refused as a configuration error: what it should do
    async with start_bridge(wait_ready=False, amqp={"url": url}) as bridge:
        await asyncio.wait_for(bridge.publisher.until_first_attempt(), 15)
        connected = bridge.publisher.is_ready

    assert not connected, "connected to a broker whose certificate was not checked"


def test_check_config_doubts_an_amqp_url_parameter_nothing_reads() -> None:
    """A TLS option spelt as another client spells it is passed over by aiormq without a word:
    the bridge warns about it, as about a misspelt environment variable."""
    settings = Settings.model_validate(
        {"amqp": {"url": "amqps://guest:guest@broker.example:5671/?ca_file=/etc/ca.pem"}}
    )

    assert any("ca_file" in doubt for doubt in settings.doubts()), settings.doubts()


# -- the operator's tools on the same URL -----------------------------------------------------


async def test_tail_gives_up_on_a_broker_that_never_completes_the_handshake(
    broker_proxy: TcpProxy, tmp_path: Path
) -> None:
    """``tail`` gives up on a link that takes the connection and answers nothing (a load
    balancer whose backend is down), as the daemon does, and says so."""
    config = write_toml(
        tmp_path / "cli.toml",
        {"amqp": {"url": proxied_amqp_url(broker_proxy), "exchange": "hunt-tls-tail"}},
    )
    broker_proxy.hold()

    tail = await start_command("tail", "--duration", "1", "--config", config)
    try:
        _, err = await asyncio.wait_for(tail.communicate(), 30)
    except TimeoutError:
        tail.kill()
        await tail.wait()
        pytest.fail("tail --duration 1 still waited for the broker's handshake after 30 s")

    assert tail.returncode == 1
    assert b"konpro-bridge: cannot tail the broker:" in err


# -- proxies ------------------------------------------------------------------------------------


async def test_the_konpro_commands_reach_the_api_through_the_proxy_the_environment_names(
    fake_konpro: FakeKonPro, tmp_path: Path
) -> None:
    """Where the way out is a proxy, the KonPro client goes through the one the environment
    names (``HTTPS_PROXY``/``HTTP_PROXY``, ``NO_PROXY``), as every other tool does."""
    config = write_toml(
        tmp_path / "bridge.toml",
        {
            "konpro": {"api_url": "http://api.konpro.invalid", "api_key": fake_konpro.api_key},
            "spool": {"path": str(tmp_path / "spool")},
            "log": {"format": "json"},
        },
    )

    ran = await run_command(
        "events", "--config", config, env={"HTTP_PROXY": fake_konpro.url, "NO_PROXY": ""}
    )

    assert (ran.code, ran.stdout.split()) == (0, list(EVENT_TYPES)), ran.stderr


async def test_healthcheck_asks_the_local_bridge_directly_whatever_proxy_is_set(
    start_bridge: BridgeFactory, exchange_name: str, tmp_path: Path
) -> None:
    """The health check of this host's bridge never goes through a proxy: in a container given
    the host's proxy settings, it would mark a healthy bridge unhealthy."""
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    async with start_bridge() as bridge:
        config = write_toml(
            tmp_path / "cli.toml",
            {
                "server": {"host": "127.0.0.1", "port": bridge.port},
                "amqp": {"url": AMQP_URL, "exchange": exchange_name},
            },
        )
        env = {"HTTP_PROXY": dead_proxy}
        check = await start_command("healthcheck", "--config", config, env=env)
        _, err = await asyncio.wait_for(check.communicate(), 15)

    assert check.returncode == 0, err


# -- the README -----------------------------------------------------------------------------


def test_the_readme_says_how_amqps_is_given_a_private_ca_or_a_client_certificate() -> None:
    """A private CA or a client certificate is given in ``amqp.url``'s query: the README says
    how."""
    text = README.read_text()
    assert "cafile" in text
    assert "certfile" in text
