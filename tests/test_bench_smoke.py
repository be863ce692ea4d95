"""The benchmark harness runs end to end and accounts for every 2xx; no timing is asserted.

About a second per contender, for the light contenders only: the naive and lean bridges, the
ceilings, and konpro-bridge when it is importable. Needs wrk (``scripts/test`` installs it where it
can: Debian's package, as root) and the local RabbitMQ; a test never installs anything itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("KONPRO_BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
CONTENDERS = (
    "konpro-bridge",
    "naive",
    "lean",
    "ceiling_publish",
    "ceiling_publish_lean",
    "ceiling_http",
)
NO_WRK = "wrk is not installed (scripts/test installs it as root on Debian: apt-get install -y wrk)"


def run_bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module>`` against the test broker; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--amqp-url", AMQP_URL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_benchmark_runs_and_every_2xx_is_a_stored_message(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip(NO_WRK)
    out = tmp_path / "report.json"
    proc = run_bench(
        "bench.run",
        *("--duration", "1", "--rounds", "1", "--warmup", "0", "--settle", "0"),
        *("--connections", "8", "--latency-connections", "2", "--inflight", "16"),
        *("--only", ",".join(CONTENDERS), "--json-out", str(out), "--no-install"),
    )
    report: dict[str, Any] = json.loads(out.read_text())

    assert not report["errors"]
    ran = set(report["contenders"])
    assert ran | set(report["skipped"]) == set(CONTENDERS)
    assert {"naive", "lean", "ceiling_publish", "ceiling_publish_lean", "ceiling_http"} <= ran
    for name in ran:
        (record,) = report["rounds"][name]
        phases = [record["load"], record["latency"]]
        for phase in phases:
            assert phase["ok"] > 0, (name, phase)
            assert phase["requests"] >= phase["ok"]
            assert phase["accounted"], (name, phase)
            assert set(phase["latency_us"]) >= {"p50", "p99"}
            if report["contenders"][name]["publishes"]:
                # Every 2xx is a stored message; at most one per connection more (in flight
                # when the load stopped).
                assert phase["lost"] == 0
                assert phase["ok"] <= phase["stored"] <= phase["ok"] + 16
            else:
                assert phase["stored"] == 0
        assert record["peak_rss"] > 0
        if report["contenders"][name]["kind"] == "http":
            assert record["startup_s"] > 0
            assert record["idle_rss"] > 0
            assert record["load"]["options"]["count"] > 0
        summary = report["summary"][name]
        assert summary["accounted"]
        assert summary["rps"] > 0
    assert "naive" in report["ratios"] or report["reference"] == "naive"
    assert "| contender |" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_instruction_counts_come_from_the_bridge_answering_under_callgrind(tmp_path: Path) -> None:
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (apt-get install -y valgrind)")
    if shutil.which("wrk") is None:
        pytest.skip(NO_WRK)
    out = tmp_path / "instructions.json"
    # Counting starts by retranslating the bridge's code under valgrind: on a busy machine the
    # first answers take over a second, so a second of posting could count none.
    proc = run_bench(
        "bench.instructions",
        *("--only", "konpro-bridge", "--seconds", "4", "--warmup", "1", "--json-out", str(out)),
    )
    [result] = json.loads(out.read_text())

    assert result["contender"] == "konpro-bridge"
    assert result["requests"] > 0
    # Counted while posting only: far more than nothing, far less than a start-up's worth.
    assert 10_000 < result["instructions_per_request"] < 50_000_000
    assert "| konpro-bridge |" in proc.stdout
