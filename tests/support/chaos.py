"""What the randomised fault tests share: a step of a plan of faults, and the bridge's log read
back as JSON lines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class Fault:
    """One step of the plan: ``kind`` for ``seconds``, then ``pause`` seconds of calm."""

    kind: str
    seconds: float
    pause: float
    detail: float = 0.0  # the slow link's delay per chunk; the wait before a kill in an outage

    def __str__(self) -> str:
        extra = f"/{self.detail:.2f}" if self.detail else ""
        return f"{self.kind}({self.seconds:.1f}{extra})"


def parse_lines(log: bytes) -> tuple[list[dict[str, Any]], list[bytes]]:
    """JSON log lines, and the lines that are not JSON (which should not exist)."""
    lines, strays = [], []
    for text in log.splitlines():
        if not text.strip():
            continue
        try:
            lines.append(orjson.loads(text))
        except orjson.JSONDecodeError:
            strays.append(text)
    return lines, strays
