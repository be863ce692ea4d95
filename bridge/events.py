"""What a KonPro delivery is, once it has passed validation, and how the bridge may answer it.

Validation is deliberately shallow: the envelope (``event_type`` and ``event_data``) is checked,
the event data is not. KonPro adds event types and fields over time; the bridge forwards the raw
body byte for byte and leaves the schema of ``event_data`` to consumers.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, NoReturn

import msgspec

EVENT_TYPE_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
EVENT_TYPE_MAX_LENGTH: Final = 255

DOCUMENTED_EVENT_TYPES: Final = (
    "avatar_video.success",
    "avatar_video.fail",
    "avatar_video_gif.success",
    "avatar_video_gif.fail",
    "video_translate.success",
    "video_translate.fail",
    "personalized_video",
)
"""The event types KonPro documents. Others are forwarded too: KonPro adds types over time."""

EVENT_ID_HEADER: Final = "KonPro-Event-Id"
TIMESTAMP_HEADER: Final = "KonPro-Timestamp"
SIGNATURE_HEADER: Final = "KonPro-Signature"
SIGNATURE_HEADERS: Final = (SIGNATURE_HEADER, "Signature")  # newer deliveries; older ones
FORWARDED_HEADERS: Final = (EVENT_ID_HEADER, TIMESTAMP_HEADER, *SIGNATURE_HEADERS)
"""The delivery's headers each message carries (the README's message contract)."""
MAX_EVENT_ID_BYTES: Final = 200  # in UTF-8; an AMQP message id holds 255
MAX_FORWARDED_HEADER_BYTES: Final = 512
"""Each forwarded header's bound, in UTF-8. A message's properties travel in one AMQP frame, and
a frame over the broker's ``frame_max`` costs the connection (at every try, for a spooled event):
at these bounds they fit the smallest frame a broker may set, 4 KiB."""


class InvalidEvent(ValueError):
    """The body is not a KonPro event envelope; the message says why, in words safe to return."""


class DeliveryRefused(Exception):
    """The bridge cannot take responsibility for a delivery now; KonPro should retry later."""

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class PublishFailed(DeliveryRefused):
    """The broker did not confirm the message; it may or may not have stored it."""


class PublishAbandoned(PublishFailed):
    """The process is stopping and no longer waits for the confirm (its grace period ran out):
    the stop's doing, not a failure of the event, which stays spooled for the next start."""


class MessageRefused(PublishFailed):
    """The broker refused a message itself, not the link: RabbitMQ closes the channel with
    PRECONDITION_FAILED for a message over its ``max_message_size``. Publishing it again fails
    the same way until the broker's settings change, so the spool sets it aside ("parks" it)
    rather than let it hold up the events behind it.

    Every publish in flight on that channel fails with the same error. ``size``, the size the
    broker's text names, tells which message it refused; ``None`` when the text does not say.
    """

    def __init__(self, reason: str, *, size: int | None = None) -> None:
        super().__init__(reason)
        self.size = size

    def blames(self, body: bytes) -> bool | None:
        """Whether the broker refused a message of this body's size; ``None``: it did not say."""
        return None if self.size is None else self.size == len(body)


class Outcome(enum.StrEnum):
    """What became of an accepted delivery; each value is a promise that it will reach the bus."""

    PUBLISHED = "published"
    SPOOLED = "spooled"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One validated KonPro event, as it will be published."""

    event_type: str
    body: bytes
    message_id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    received_at: float = field(default_factory=time.time)


def parse_event_type(body: bytes) -> str:
    """The envelope's ``event_type``, after checking the envelope; raises ``InvalidEvent``.

    Only the envelope is read: ``event_data`` is checked to be a JSON object and left as bytes,
    so that a body is checked in one pass that builds nothing of it, whatever it holds (a body
    of many tiny objects would otherwise cost tens of times its size, and block the loop).
    """
    quick = _read_quickly(body)
    if quick is None or _may_repeat_a_key(body):
        envelope = _read_by_the_grammar(body)
        if envelope.repeated:
            raise InvalidEvent(f"the envelope names {', '.join(envelope.repeated)} more than once")
        event_type, data_is_object = envelope.event_type, envelope.data_is_object
    else:
        event_type, data_is_object = quick
    if not isinstance(event_type, str):
        raise InvalidEvent("event_type must be a string")
    if not 0 < len(event_type) <= EVENT_TYPE_MAX_LENGTH or not EVENT_TYPE_PATTERN.fullmatch(
        event_type
    ):
        raise InvalidEvent(
            "event_type must be 1-255 characters: words of [A-Za-z0-9_-] joined by single dots"
        )
    if not data_is_object:
        raise InvalidEvent("event_data must be a JSON object")
    return event_type


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The KonPro headers the message carries; raises ``InvalidEvent`` for one that is not
    text, or too long to forward.

    aiohttp hands undecodable header bytes over as surrogates, which neither the AMQP headers
    table nor the spool can hold.
    """
    forwarded = {}
    for name in FORWARDED_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        if not _fits(value, MAX_FORWARDED_HEADER_BYTES):
            raise InvalidEvent(
                f"{name} must be printable UTF-8 text of at most {MAX_FORWARDED_HEADER_BYTES} bytes"
            )
        forwarded[name] = value
    return forwarded


def message_id_for(body: bytes, event_id: str | None) -> str:
    """KonPro's event id when it sent one, else a digest of the body: stable across retries."""
    if event_id:
        if not _fits(event_id, MAX_EVENT_ID_BYTES):
            raise InvalidEvent(
                f"{EVENT_ID_HEADER} must be printable and at most {MAX_EVENT_ID_BYTES} bytes"
            )
        return event_id
    return body_digest(body)


MAX_MESSAGE_ID_BYTES: Final = 255  # an AMQP short string


def publishable(delivery: Delivery) -> tuple[Delivery, list[str]]:
    """``delivery`` as it can be published, and what had to change. Live deliveries are checked
    as they come; a spooled one may come from an older version, which took longer event ids
    and larger headers than AMQP's properties hold: published as it is, it would fail every
    time, and hold up the events behind it. Its message id becomes the body's digest (what the
    bridge uses when KonPro sends no event id), and a header too large is left out."""
    changes = []
    message_id = delivery.message_id
    if not _fits(message_id, MAX_MESSAGE_ID_BYTES):
        message_id = body_digest(delivery.body)
        changes.append("message id longer than AMQP's 255 bytes: the body's digest instead")
    headers = {
        name: value
        for name, value in delivery.headers.items()
        if isinstance(value, str) and _fits(value, MAX_FORWARDED_HEADER_BYTES)
    }
    if len(headers) < len(delivery.headers):
        dropped = ", ".join(sorted(set(delivery.headers) - set(headers)))
        changes.append(f"header {dropped} over {MAX_FORWARDED_HEADER_BYTES} bytes: left out")
    if not changes:
        return delivery, changes
    return replace(delivery, message_id=message_id, headers=headers), changes


def claimed_event_id(headers: Mapping[str, str]) -> str | None:
    """The ``KonPro-Event-Id`` a delivery came with, for the log line of one that was refused
    (it is not signed: a claim, which matches a refusal with KonPro's list of failed
    deliveries); ``None`` if absent or not one the bridge would take."""
    event_id = headers.get(EVENT_ID_HEADER)
    return event_id if event_id and _fits(event_id, MAX_EVENT_ID_BYTES) else None


def _fits(value: str, max_bytes: int) -> bool:
    """Printable, and at most ``max_bytes`` in UTF-8. Printable first: a surrogate (undecodable
    bytes, as aiohttp hands them over) cannot be encoded to count its bytes."""
    return value.isprintable() and len(value.encode()) <= max_bytes


def body_digest(body: bytes) -> str:
    """SHA-256 of the body: what KonPro's signature covers, and what stays the same when a
    captured delivery is replayed with other headers."""
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True, slots=True)
class _Envelope:
    """What the bridge reads of a body: it is a JSON object, with these."""

    event_type: Any
    data_is_object: bool
    repeated: tuple[str, ...] = ()  # envelope keys named more than once


class _Keys(msgspec.Struct):
    """The envelope's two keys; ``event_data`` as its bytes, checked to be JSON, not built."""

    event_type: Any = None
    event_data: msgspec.Raw = msgspec.Raw()


_KEYS_DECODER: Final = msgspec.json.Decoder(_Keys)


def _read_quickly(body: bytes) -> tuple[Any, bool] | None:
    """The envelope's ``event_type``, and whether its ``event_data`` is an object, read by
    msgspec; ``None`` when it refuses the body, which the standard library's parser then reads
    (see ``_read_by_the_grammar``)."""
    try:
        keys = _KEYS_DECODER.decode(body)
        body.decode()  # msgspec does not look inside what it leaves as bytes: UTF-8 throughout
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # ValidationError too
        return None  # the exact reading says what is wrong, if anything is
    return keys.event_type, bytes(keys.event_data)[:1] == b"{"  # msgspec starts it at the value


_OBJECT: Final = object()  # what an object is read as by _read_by_the_grammar
_NUMBER: Final = object()  # and a number


def _read_by_the_grammar(body: bytes) -> _Envelope:
    """The envelope, read by the standard library's parser, which also tells the keys the
    envelope names more than once, and takes what the JSON grammar allows but msgspec refuses:
    an unpaired surrogate escape (``"\\ud83d"``: a title cut in the middle of an emoji, as
    ``JSON.stringify`` writes it). Refused, KonPro would retry such an event for a day, then drop
    it. What is not JSON (``NaN``, a byte-order mark, other encodings) stays refused.

    Objects and numbers are read as marks, not built, and only the outermost object's keys are
    kept; arrays are built, of marks (the standard library's parser has no hook for them): a
    body of many tiny arrays costs some thirty times its size for a moment, and about a quarter
    of a second a megabyte. Only a body that may name a key twice, or that msgspec refuses,
    comes here; with a webhook secret, only signed ones.
    """
    outermost: list[tuple[str, Any]] = []

    def mark(pairs: list[tuple[str, Any]]) -> object:
        outermost[:] = pairs  # the outermost object closes last
        return _OBJECT

    try:
        top = json.loads(
            body.decode(),
            object_pairs_hook=mark,
            parse_int=_number,  # none is converted: none is too large, none taken for text
            parse_float=_number,
            parse_constant=_not_json,
        )
    except RecursionError:
        raise InvalidEvent("body nests too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidEvent(f"body is not valid JSON: {_first_line(exc)}") from None
    if top is not _OBJECT:
        raise InvalidEvent("body must be a JSON object")
    keys = [key for key, _ in outermost]
    pairs = dict(outermost)  # the last of repeated keys, as msgspec and orjson read them
    return _Envelope(
        event_type=pairs.get("event_type"),
        data_is_object=pairs.get("event_data") is _OBJECT,
        repeated=tuple(k for k in ("event_type", "event_data") if keys.count(k) > 1),
    )


def _number(text: str) -> object:
    return _NUMBER


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


def _may_repeat_a_key(body: bytes) -> bool:
    """Whether the envelope could name ``event_type`` or ``event_data`` twice: a cheap look at
    the bytes, so that only such bodies pay for the exact reading. With no more than the two
    keys beginning ``"event_``, only a key spelt with a ``\\u`` escape could be one more; an
    escape elsewhere (an accent in a title) is no reason."""
    if body.count(b'"event_') > 2:
        return True
    return b"\\u" in body and any(
        _unescaped(token) in _ENVELOPE_KEYS for token in _ESCAPED_SHORT_STRING.findall(body)
    )


_ENVELOPE_KEYS: Final = frozenset({"event_type", "event_data"})
# A string token of at most 10 characters, at least one of them a \u escape: a key of the
# envelope could be spelt so.
_ESCAPED_SHORT_STRING: Final = re.compile(rb'"(?=[^"]*\\u)(?:[^"\\]|\\u[0-9a-fA-F]{4}|\\.){1,10}"')


def _unescaped(token: bytes) -> str | None:
    """The text of a JSON string token, or ``None``."""
    try:
        text = json.loads(token)
    except ValueError:
        return None
    return text if isinstance(text, str) else None


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]
