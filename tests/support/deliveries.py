"""Deliveries made up for tests of the spool and the forwarder: numbered, of a chosen size."""

from __future__ import annotations

from bridge.events import Delivery

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
