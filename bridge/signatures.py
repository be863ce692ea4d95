"""Is a delivery from KonPro, and is it new? Signature, timestamp and replay checks.

KonPro signs the raw body only: ``hex(HMAC-SHA256(secret, body))``, keyed with the secret string
exactly as given (``whsec_`` prefix included). ``KonPro-Timestamp`` and ``KonPro-Event-Id`` are
*not* signed, so the timestamp check only turns away naive replays of old captures; the replay
guard, keyed by the body's digest (what the signature covers), is what stops a delivery from
being published twice within its window.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from bridge.events import SIGNATURE_HEADERS, TIMESTAMP_HEADER

_DIGEST_SIZE: Final = hashlib.sha256().digest_size


class SignatureRejected(Exception):
    """The delivery is not authentic or not fresh; ``reason`` is for our log, never the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sign(body: bytes, secret: str) -> str:
    """The signature KonPro would send for ``body``: lowercase hex HMAC-SHA256."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class SignatureVerifier:
    """Checks a delivery's signature against every secret in force, and its timestamp if sent.

    Several secrets allow rotation: a delivery signed with any of them passes. Each secret's
    keyed HMAC state is computed once and copied per request, which skips re-hashing the key.
    """

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        timestamp_tolerance: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret is required")
        self._keyed = tuple(hmac.new(s.encode(), digestmod=hashlib.sha256) for s in secrets)
        self._tolerance = timestamp_tolerance
        self._clock = clock

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Return if the delivery is authentic and fresh, else raise ``SignatureRejected``."""
        claimed = _parse_signature(_first_header(headers, SIGNATURE_HEADERS))
        if not any(hmac.compare_digest(self._digest(k, body), claimed) for k in self._keyed):
            raise SignatureRejected("signature mismatch")
        timestamp = _first_header(headers, (TIMESTAMP_HEADER,))
        if timestamp is not None:
            self._check_timestamp(timestamp)

    @staticmethod
    def _digest(keyed: hmac.HMAC, body: bytes) -> bytes:
        mac = keyed.copy()
        mac.update(body)
        return mac.digest()

    def _check_timestamp(self, value: str) -> None:
        try:
            sent_at = float(value)
        except ValueError:
            raise SignatureRejected("malformed timestamp") from None
        if not math.isfinite(sent_at):  # float() accepts "nan", which compares false to all
            raise SignatureRejected("malformed timestamp")
        skew = self._clock() - sent_at
        tolerance = f"konpro.timestamp_tolerance is {self._tolerance:g} s"
        if skew > self._tolerance:
            raise SignatureRejected(f"stale timestamp: sent {skew:.0f} s ago, {tolerance}")
        if skew < -self._tolerance:
            raise SignatureRejected(f"future timestamp: {-skew:.0f} s ahead, {tolerance}")


class Authenticator:
    """The signature policy in force: verify when a secret is known, else let deliveries in,
    or, when signatures are ``required``, keep every delivery out until one is.

    The configured secrets stay for the process's life. A secret learnt at run time (from
    ``endpoint.add``) is set with ``learn_secret``: from then on every delivery must be signed,
    and a later one replaces it, since a new registration revokes the old endpoint's secret.
    """

    def __init__(
        self, secrets: Sequence[str], *, timestamp_tolerance: float, required: bool = False
    ) -> None:
        self._configured = tuple(dict.fromkeys(secrets))
        self._learnt: str | None = None
        self._tolerance = timestamp_tolerance
        self._required = required
        self._verifier = self._build()

    @property
    def enabled(self) -> bool:
        return self._verifier is not None

    def learn_secret(self, secret: str) -> None:
        if secret and secret != self._learnt:
            self._learnt = secret
            self._verifier = self._build()

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Raise ``SignatureRejected`` unless the delivery is authentic (or no secret is known,
        and none is required)."""
        if self._verifier is not None:
            self._verifier.verify(body, headers)
        elif self._required:
            raise SignatureRejected("no webhook secret known yet (konpro.require_signature)")

    def _build(self) -> SignatureVerifier | None:
        learnt = () if self._learnt is None else (self._learnt,)
        secrets = tuple(dict.fromkeys((*self._configured, *learnt)))
        if not secrets:
            return None
        return SignatureVerifier(secrets, timestamp_tolerance=self._tolerance)


class ReplayGuard:
    """Remembers the keys of deliveries already taken (the relay uses the body's digest) for
    ``window`` seconds, at most ``max_entries`` of them (the oldest are forgotten first). A zero
    for either disables it.

    A key is only remembered once its delivery is safely published or spooled: a delivery that
    failed must be accepted when KonPro retries it. ``tell`` passes each key remembered on to
    the other workers (``bridge.replay_mesh``), whose keys come back through ``heard``.
    """

    def __init__(
        self,
        window: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
        tell: Callable[[str], None] | None = None,
    ) -> None:
        self._window = window
        self._max_entries = max_entries
        self._clock = clock
        self._tell = tell
        self._remembered: OrderedDict[str, float] = OrderedDict()  # oldest first

    @property
    def enabled(self) -> bool:
        return self._window > 0 and self._max_entries > 0

    def __len__(self) -> int:
        return len(self._remembered)

    def seen(self, key: str) -> bool:
        """Whether ``key`` was remembered within the window."""
        if not self.enabled:
            return False
        self._expire(self._clock())
        return key in self._remembered

    def remember(self, key: str) -> None:
        """Record that ``key``'s delivery has been taken here; its window starts now."""
        self.heard(key)
        if self._tell is not None and self.enabled:
            self._tell(key)

    def heard(self, key: str) -> None:
        """Record that ``key``'s delivery has been taken by another worker."""
        if not self.enabled:
            return
        now = self._clock()
        self._remembered[key] = now
        self._remembered.move_to_end(key)  # keeps the dict ordered by time
        self._expire(now)
        while len(self._remembered) > self._max_entries:
            self._remembered.popitem(last=False)

    def _expire(self, now: float) -> None:
        cutoff = now - self._window
        while self._remembered and next(iter(self._remembered.values())) <= cutoff:
            self._remembered.popitem(last=False)


def _first_header(headers: Mapping[str, str], names: Sequence[str]) -> str | None:
    """The first of ``names`` present, tried as spelled and in lower case for plain dicts."""
    for name in names:
        value = headers.get(name) or headers.get(name.lower())
        if value:
            return value
    return None


def _parse_signature(value: str | None) -> bytes:
    if value is None:
        raise SignatureRejected("missing signature")
    if len(value) != 2 * _DIGEST_SIZE:
        raise SignatureRejected("malformed signature")
    try:
        digest = bytes.fromhex(value)  # either case; fromhex also skips spaces, hence the check
    except ValueError:
        raise SignatureRejected("malformed signature") from None
    if len(digest) != _DIGEST_SIZE:
        raise SignatureRejected("malformed signature")
    return digest
