"""The contenders: declarative definitions the harness starts, waits for and loads.

A contender is a command line and environment with ``{placeholders}`` filled in per run (see
``Slots``), an optional config file template written to ``{config}``, a ready URL and a post URL.
``kind="http"`` contenders are servers that wrk loads; ``kind="publish"`` contenders are load
generators themselves and print a ``BENCH_JSON`` line. To add one, append to ``CONTENDERS``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Slots:
    """Values substituted into a contender's command, environment and config template."""

    python: str
    port: int
    amqp_url: str
    exchange: str
    config: str
    spool: str
    inflight: int
    duration: float
    run_id: str

    def fill(self, template: str) -> str:
        return template.format(
            python=self.python,
            port=self.port,
            amqp_url=self.amqp_url,
            exchange=self.exchange,
            config=self.config,
            spool=self.spool,
            inflight=self.inflight,
            duration=self.duration,
            run_id=self.run_id,
        )


def _always() -> str | None:
    return None


@dataclass(frozen=True)
class Contender:
    name: str
    description: str
    command: tuple[str, ...]
    kind: Literal["http", "publish"] = "http"
    env: Mapping[str, str] = field(default_factory=dict)
    config_template: str | None = None
    ready_url: str = "http://127.0.0.1:{port}/readyz"
    post_url: str = "http://127.0.0.1:{port}/webhooks/konpro"
    publishes: bool = True
    exchange_arguments: Mapping[str, str] = field(default_factory=dict)
    """Arguments the contender declares its exchange with (the harness declares it first)."""
    also_exchanges: tuple[str, ...] = ()
    also_queues: tuple[str, ...] = ()
    """What else the contender declares, to delete after its round."""
    by_default: bool = True
    """False: runs only when named with --only (diagnostic variants)."""
    unavailable: Callable[[], str | None] = _always
    """Returns why the contender cannot run here, or None when it can."""


def contender_pythonpath() -> str:
    """PYTHONPATH for contenders: the caller's first, then the repository root (for bench.*)."""
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))


def _bridge_unavailable() -> str | None:
    # Checked the way the contender will run: a fresh interpreter, outside the repository root
    # (so that ./bridge does not shadow an installed one), with the contenders' PYTHONPATH.
    with tempfile.TemporaryDirectory() as cwd:
        probe = subprocess.run(  # noqa: S603 - fixed argv
            [PYTHON, "-c", "import bridge.cli"],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": contender_pythonpath()},
            capture_output=True,
            check=False,
        )
    if probe.returncode != 0:
        return "bridge.cli is not importable (the bridge is not in this tree yet); skipped"
    return None


def _module_unavailable(*modules: str) -> Callable[[], str | None]:
    def check() -> str | None:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            return f"missing {', '.join(missing)} (pip install -e '.[bench]'); skipped"
        return None

    return check


BRIDGE_CONFIG = """\
[server]
host = "127.0.0.1"
port = {port}

[amqp]
url = "{amqp_url}"
exchange = "{exchange}"

[spool]
path = "{spool}"

[reconcile]
enabled = false

[log]
level = "info"
format = "json"
"""

_APP_ENV = {
    "BENCH_PORT": "{port}",
    "BENCH_AMQP_URL": "{amqp_url}",
    "BENCH_EXCHANGE": "{exchange}",
}

_PUBLISH_ENV = {
    "BENCH_AMQP_URL": "{amqp_url}",
    "BENCH_EXCHANGE": "{exchange}",
    "BENCH_INFLIGHT": "{inflight}",
    "BENCH_DURATION": "{duration}",
    "BENCH_RUN_ID": "{run_id}",
}


def _bridge(name: str, description: str, config: str, *, by_default: bool = True) -> Contender:
    return Contender(
        name=name,
        description=description,
        command=("{python}", "-m", "bridge", "run", "--config", "{config}"),
        config_template=config,
        # The bridge declares each exchange with an alternate exchange "<name>.unrouted"
        # (fanout) feeding a durable queue of that name.
        exchange_arguments={"alternate-exchange": "{exchange}.unrouted"},
        also_exchanges=("{exchange}.unrouted",),
        also_queues=("{exchange}.unrouted",),
        by_default=by_default,
        unavailable=_bridge_unavailable,
    )


CONTENDERS: tuple[Contender, ...] = (
    _bridge(
        "konpro-bridge",
        "konpro-bridge, default settings, JSON info logging to a file",
        BRIDGE_CONFIG,
    ),
    _bridge(
        "konpro-bridge-warnlog",
        "konpro-bridge as above but [log] level = warning (no per-request log line)",
        BRIDGE_CONFIG.replace('level = "info"', 'level = "warning"'),
        by_default=False,
    ),
    _bridge(
        "konpro-bridge-bare",
        "konpro-bridge without its per-delivery extras: [log] level = warning, no replay memory",
        BRIDGE_CONFIG.replace('level = "info"', 'level = "warning"')
        + "\n[konpro]\nreplay_window = 0.0\n",
        by_default=False,
    ),
    _bridge(
        "konpro-bridge-2w",
        "konpro-bridge as deployed, but [server] workers = 2",
        BRIDGE_CONFIG.replace("port = {port}", "port = {port}\nworkers = 2"),
        by_default=False,
    ),
    Contender(
        name="naive",
        description="minimal aiohttp + aio-pika bridge (bench/naive_bridge.py)",
        command=("{python}", "-m", "bench.naive_bridge"),
        env=_APP_ENV,
    ),
    Contender(
        name="lean",
        description="the minimal bridge publishing as konpro-bridge does (bench/lean_bridge.py)",
        command=("{python}", "-m", "bench.lean_bridge"),
        env=_APP_ENV,
        by_default=False,
    ),
    Contender(
        name="flask",
        description="Flask + pika, gunicorn 4 sync workers (bench/flask_bridge.py)",
        command=(
            "{python}",
            "-m",
            "gunicorn",
            "--workers",
            "4",
            "--bind",
            "127.0.0.1:{port}",
            "--log-level",
            "warning",
            "bench.flask_bridge:app",
        ),
        env=_APP_ENV,
        unavailable=_module_unavailable("flask", "gunicorn", "pika"),
    ),
    Contender(
        name="ceiling_publish",
        description="raw confirmed persistent publishes, one aio-pika process, no HTTP",
        command=("{python}", "-m", "bench.ceiling_publish"),
        kind="publish",
        env=_PUBLISH_ENV,
    ),
    Contender(
        name="ceiling_publish_lean",
        description="as ceiling_publish, via aiormq's channel on uvloop (as the bridge)",
        command=("{python}", "-m", "bench.ceiling_publish"),
        kind="publish",
        env={**_PUBLISH_ENV, "BENCH_LEAN": "1"},
        by_default=False,
    ),
    Contender(
        name="ceiling_http",
        description="aiohttp answering the same POSTs, no AMQP",
        command=("{python}", "-m", "bench.ceiling_http"),
        env={"BENCH_PORT": "{port}"},
        publishes=False,
    ),
)
