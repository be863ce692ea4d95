"""Deliveries made up for tests: numbered ones for the spool and the forwarder, of a chosen
size; envelopes of a video, and posting one as KonPro would."""

from __future__ import annotations

import aiohttp

from bridge.events import Delivery

JSON = {"Content-Type": "application/json"}

RECEIVED_AT = 1_700_000_000.0


def delivery(n: int, *, size: int = 16, received_at: float = RECEIVED_AT) -> Delivery:
    """Event ``n``: message id ``evt_<n>``, a body of ``size`` digits."""
    return Delivery(
        event_type="avatar_video.success",
        body=f"{n:0{size}d}".encode(),
        message_id=f"evt_{n}",
        headers={"KonPro-Event-Id": f"evt_{n}"},
        received_at=received_at,
    )


def envelope(video_id: str, event_type: str = "avatar_video.success") -> bytes:
    """A KonPro envelope about one video."""
    return (
        f'{{"event_type": "{event_type}", "event_data": {{"video_id": "{video_id}"}}}}'
    ).encode()


async def post_status(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str] | None = None
) -> int:
    """POST ``body`` as KonPro would; the answer's status."""
    async with http.post(url, data=body, headers=headers or JSON) as response:
        return response.status
