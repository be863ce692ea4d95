"""Keep the account's KonPro webhook registration as configured (issue #3).

Desired state: exactly one endpoint for ``konpro.public_url``, subscribed to ``konpro.events``
(an empty list meaning every event), enabled. Each run lists the account's endpoints, ``plan``
decides what differs, and in ``repair`` mode the reconciler fixes it; ``verify`` mode only reports.

Replicas behind one URL all run this. They converge without talking to each other because every
one of them, seeing the same endpoints, keeps the same one (the oldest, ties broken by id) and
deletes the rest; a delete that loses the race to another replica is not an error.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import structlog
from pydantic import SecretStr
from yarl import URL

from bridge.config import KonProSettings, ReconcileSettings, Settings
from bridge.konpro import (
    AuthenticationError,
    Endpoint,
    KonProClient,
    KonProError,
    NotFound,
    RateLimited,
    ValidationFailed,
)
from bridge.secret_file import load_stored, load_stored_secret, store_secret
from bridge.tasks import outlasting_cancellation

log = structlog.get_logger(__name__)

FIRST_RETRY: Final = 5.0  # seconds before the first retry after a failed run
_MAX_DOUBLINGS: Final = 60  # past any max_backoff; 2**1024 seconds would overflow a float
JITTER: Final = 0.1  # runs are spread by +/-10% so that replicas drift apart

ResultKind = Literal["ok", "added", "updated", "deduplicated", "disabled", "drift", "error"]


class ActionKind(enum.StrEnum):
    ADD = "add"
    UPDATE = "update"
    DELETE = "delete"
    REPORT_DISABLED = "report_disabled"  # KonPro's API cannot re-enable an endpoint


@dataclass(frozen=True, slots=True)
class Action:
    """One step towards the desired state. ``events=None`` means every event type."""

    kind: ActionKind
    url: str
    endpoint_id: str | None = None
    events: tuple[str, ...] | None = None
    new_url: str | None = None  # UPDATE: the URL to deliver to instead

    def __str__(self) -> str:
        target = f"{self.endpoint_id} ({self.url})" if self.endpoint_id else self.url
        if self.kind in {ActionKind.ADD, ActionKind.UPDATE}:
            moved = f" url={self.new_url}" if self.new_url else ""
            return f"{self.kind} {target}{moved} events={_describe_events(self.events)}"
        return f"{self.kind} {target}"


@dataclass(frozen=True, slots=True)
class Desired:
    """What the account should hold for this bridge."""

    url: str
    events: tuple[str, ...] | None  # None: every event type

    @classmethod
    def from_settings(cls, konpro: KonProSettings) -> Desired:
        return cls(url=konpro.public_url, events=tuple(konpro.events) or None)


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """The outcome of one run, kept for the status endpoint and metrics.

    ``actions`` are those taken, or in verify mode those that would have been.
    ``secret_stored`` says the run wrote a new signing secret to the secret file.
    """

    time: datetime
    kind: ResultKind
    endpoint_id: str | None = None
    error: str | None = None
    actions: tuple[Action, ...] = ()
    secret_stored: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready rendering; it holds no secret."""
        return {
            "time": self.time.isoformat(),
            "result": self.kind,
            "endpoint_id": self.endpoint_id,
            "error": self.error,
            "actions": [str(action) for action in self.actions],
            "secret_stored": self.secret_stored,
        }


def normalize_url(url: str) -> str:
    """``url`` in a form where equal endpoints compare equal.

    Scheme and host case, an explicit default port and a trailing slash do not make a new URL.
    """
    try:
        parsed = URL(url.strip())
    except ValueError:
        return url
    host = parsed.host_subcomponent  # an IPv6 address in its brackets
    if not parsed.is_absolute() or host is None:
        return url
    return str(
        URL.build(
            scheme=parsed.scheme.lower(),
            user=parsed.raw_user,
            password=parsed.raw_password,
            host=host.lower(),
            port=None if parsed.is_default_port() else parsed.port,
            path=parsed.raw_path.rstrip("/"),
            query_string=parsed.raw_query_string,
            encoded=True,
        )
    )


def _path(url: str) -> str:
    try:
        return URL(url.strip()).raw_path
    except ValueError:
        return url


def select_keeper(endpoints: Sequence[Endpoint], desired: Desired) -> Endpoint | None:
    """The endpoint for the desired URL that every replica agrees to keep, if there is one.

    The oldest wins; an enabled endpoint is preferred to a disabled one, since deleting the
    registration that works to keep one that does not would stop deliveries.
    """
    ours = _ours(endpoints, desired)
    return min(ours, key=_seniority) if ours else None


def plan(endpoints: Sequence[Endpoint], desired: Desired) -> list[Action]:
    """The steps that turn ``endpoints`` into the desired state; empty when nothing differs.

    Endpoints for other URLs are never part of a plan.
    """
    keeper = select_keeper(endpoints, desired)
    if keeper is None:
        return [Action(ActionKind.ADD, desired.url, events=desired.events)]
    actions = [
        Action(ActionKind.DELETE, endpoint.url, endpoint.endpoint_id)
        for endpoint in sorted(_ours(endpoints, desired), key=_seniority)
        if endpoint is not keeper
    ]
    # The same endpoint by normalize_url may still differ in its path's trailing slash, and the
    # bridge serves its webhook path exactly: KonPro's deliveries there would be answered 405.
    moved = _path(keeper.url) != _path(desired.url)
    if moved or not same_events(keeper.events, desired.events):
        actions.append(
            Action(
                ActionKind.UPDATE,
                keeper.url,
                keeper.endpoint_id,
                events=desired.events,
                new_url=desired.url if moved else None,
            )
        )
    if not keeper.enabled:
        actions.append(Action(ActionKind.REPORT_DISABLED, keeper.url, keeper.endpoint_id))
    return actions


def same_events(actual: Sequence[str] | None, desired: Sequence[str] | None) -> bool:
    """Whether two subscriptions are equal, ignoring order and repeats.

    An empty list counts as "all events": read the other way, every run would update it again.
    """
    if not actual or not desired:
        return not actual and not desired
    return set(actual) == set(desired)


def next_delay(
    interval: float,
    max_backoff: float,
    failures: int,
    *,
    retry_cannot_help: bool = False,
    retry_after: float = 0.0,
) -> float:
    """Seconds until the next run after ``failures`` failed runs in a row.

    Healthy, or failing in a way no retry can fix (a refused key, a signing secret that is not
    the endpoint's): the interval, +/-10%. Otherwise
    exponential back-off from ``min(interval, FIRST_RETRY)``, never beyond ``max_backoff``, and
    never sooner than a rate limit's ``Retry-After``.
    """
    if failures == 0 or retry_cannot_help:
        return _jittered(interval)
    backoff = min(interval, FIRST_RETRY) * 2 ** min(failures - 1, _MAX_DOUBLINGS)
    return min(max_backoff, max(_jittered(min(backoff, max_backoff)), retry_after))


class Reconciler:
    """Brings the KonPro account to the desired state, once or on a schedule.

    ``secret_store_dir`` (the spool directory) receives the signing secret of an endpoint this
    reconciler registers when ``konpro.webhook_secret`` is not configured.
    """

    def __init__(
        self,
        client: KonProClient,
        konpro: KonProSettings,
        reconcile: ReconcileSettings,
        secret_store_dir: Path,
        *,
        preview: bool = False,
    ) -> None:
        """``preview``: a verify run that shows what repair would do (``--dry-run``), so a
        secret repair would store does not count as one missing."""
        if not konpro.public_url:
            raise ValueError("konpro.public_url is not set: there is nothing to reconcile")
        self._client = client
        self._desired = Desired.from_settings(konpro)
        self._configured_secrets = frozenset(konpro.webhook_secrets)
        self._settings = reconcile
        self._registration_allowance = konpro.registration_allowance
        self._stores_known_secret = reconcile.mode == "repair" or preview
        self._secret_dir = secret_store_dir
        self._events_checked = False
        self._auth_failing = False  # the last run's key was refused: no back-off can help
        self._auth_reported = False  # said so, since the last run that got through
        self._unverifiable_reported_for: str | None = None  # endpoint id
        self._secret_unverifiable = False
        self._stored_this_run = False  # a new secret was written to the file in this run
        self._retry_after = 0.0
        self.last_result: ReconcileResult | None = None

    @classmethod
    def from_settings(cls, client: KonProClient, settings: Settings) -> Reconciler:
        return cls(client, settings.konpro, settings.reconcile, settings.spool.path)

    async def run_once(self) -> ReconcileResult:
        """One comparison (and, in repair mode, repair). KonPro's failures become the result."""
        done: list[Action] = []
        self._stored_this_run = False
        try:
            result = await self._reconcile(done)
        except KonProError as exc:
            result = self._failed(exc, done)
        except OSError as exc:  # the secret file could not be written: KonPro answered
            self._say_not_stored(exc)
            error = f"storing the signing secret failed: {exc}"
            stored = self._stored_this_run
            result = _result("error", error=error, actions=tuple(done), secret_stored=stored)
            self._answered()
        else:
            self._answered()
        self.last_result = result
        return result

    def _answered(self) -> None:
        """KonPro took the key and asked for no wait: what an earlier failure said is over."""
        self._auth_failing = self._auth_reported = False
        self._retry_after = 0.0

    async def run_forever(
        self, on_result: Callable[[ReconcileResult], object] | None = None
    ) -> None:
        """Run now, then every ``reconcile.interval`` seconds, until cancelled.

        Nothing KonPro does makes this raise; failed runs are retried with back-off.
        """
        failures = 0
        while True:
            result = await self._run_guarded()
            if result.kind != "error" and failures:
                # At the level the failures were told at: a log read at warning tells both.
                log.warning("reconcile.recovered", result=result.kind, failed_runs=failures)
            failures = failures + 1 if result.kind == "error" else 0
            if on_result is not None:
                _notify(on_result, result)
            delay = self.next_run_in(failures)
            log.debug("reconcile.sleeping", delay=round(delay, 3), failures=failures)
            await asyncio.sleep(delay)

    def next_run_in(self, failures: int) -> float:
        """Seconds until the next run, after the last run and ``failures`` failed in a row."""
        return next_delay(
            self._settings.interval,
            self._settings.max_backoff,
            failures,
            retry_cannot_help=self._auth_failing or self._secret_unverifiable,
            retry_after=self._retry_after,
        )

    async def _run_guarded(self) -> ReconcileResult:
        try:
            return await self.run_once()
        except Exception as exc:  # a bug must not end reconciliation for the process's life
            log.exception("reconcile.crashed")
            self.last_result = _result("error", error=f"unexpected {type(exc).__name__}: {exc}")
            return self.last_result

    async def _reconcile(self, done: list[Action]) -> ReconcileResult:
        await self._check_event_names()
        endpoints = await self._client.list_endpoints()
        actions = plan(endpoints, self._desired)
        keeper = select_keeper(endpoints, self._desired)
        if self._settings.mode == "verify":
            kind = self._verified(actions)
            done.extend(actions)  # what repair would do
        else:
            keeper = await self._repair(actions, keeper, done)
            kind = _summary(actions)
        endpoint_id = keeper.endpoint_id if keeper else None
        unverifiable = await self._unverifiable(endpoint_id, _secret_of(keeper))
        self._report_unverifiable(endpoint_id, unverifiable)
        self._secret_unverifiable = unverifiable is not None
        result = _result(
            "error" if unverifiable else kind,
            endpoint_id=endpoint_id,
            error=unverifiable,
            actions=tuple(done),
            secret_stored=self._stored_this_run,
        )
        report = log.info if result.actions else log.debug
        report("reconcile.done", **_fields(result))
        return result

    async def _repair(
        self, actions: list[Action], keeper: Endpoint | None, done: list[Action]
    ) -> Endpoint | None:
        """Carry out the plan; the endpoint kept (one added, if there was none).

        The kept endpoint's secret is stored before the writes: a step that fails must not keep
        a known secret off the disk (an update keeps the endpoint's id and secret, and no step
        deletes the kept one). A disk that refuses it must not keep the repairs from KonPro
        either: the failure is raised once they are made.
        """
        try:
            await self._sync_secret(keeper.endpoint_id if keeper else None, _secret_of(keeper))
        except OSError as exc:
            not_stored: OSError | None = exc
        else:
            not_stored = None
        for action in actions:
            if action.kind is ActionKind.ADD:
                keeper = await outlasting_cancellation(
                    self._register(action, done),
                    within=self._registration_allowance,
                    on_failure=self._registration_failed_at_stop,
                )
            else:
                await self._apply(action)
                done.append(action)
        if not_stored is not None:
            raise not_stored
        return keeper

    async def _unverifiable(self, endpoint_id: str | None, secret: SecretStr | None) -> str | None:
        """Why deliveries to the kept endpoint cannot be checked, if they cannot."""
        try:
            return self._secret_not_configured(secret) or await self._secret_outdated(
                endpoint_id, secret
            )
        except OSError as exc:  # a secret file this run did not write, and cannot read
            return f"the stored signing secret cannot be read: {exc}"

    def _secret_not_configured(self, secret: SecretStr | None) -> str | None:
        """Why deliveries to the kept endpoint will be refused: KonPro signs them with a secret
        the settings do not hold (the endpoint was registered again, or the setting is wrong).
        Only when secrets are configured and KonPro told this one."""
        value = secret.get_secret_value() if secret is not None else ""
        if not self._configured_secrets or not value or value in self._configured_secrets:
            return None
        return (
            "the endpoint's signing secret is not konpro.webhook_secret (nor a previous one): "
            "its deliveries are refused (401) until the setting holds the endpoint's secret"
        )

    async def _secret_outdated(
        self, endpoint_id: str | None, secret: SecretStr | None
    ) -> str | None:
        """Why deliveries to the kept endpoint cannot be checked: KonPro does not tell its
        secret (``endpoint.list`` may answer ``null``), and the stored one belongs to another
        endpoint, since deleted (a duplicate of replicas that registered at once), or none is
        stored (the answer to the registration was lost). Re-registering to learn one could
        make replicas of one URL replace each other's endpoints for ever: an operator decides.
        A secret KonPro tells was stored by this run, unless it is a verify run, which stores
        nothing: then it is checked against the one stored.

        Read from the files, not remembered: an operator's ``reconcile --once`` may have stored
        a newer secret, and a restarted bridge still knows whose secret it holds.
        """
        if self._configured_secrets or endpoint_id is None:
            return None
        if secret is None or not secret.get_secret_value():
            return await self._unknown_secret_outdated(endpoint_id)
        if self._stores_known_secret:
            return None
        stored = await asyncio.to_thread(load_stored_secret, self._secret_dir)
        if stored == secret.get_secret_value():
            return None
        return (
            "the endpoint's signing secret is not the one stored, and verify mode stores "
            "nothing: signatures are not checked with it; set konpro.webhook_secret to it, "
            "or let a repair run store it"
        )

    async def _unknown_secret_outdated(self, endpoint_id: str) -> str | None:
        stored = await asyncio.to_thread(load_stored, self._secret_dir)
        if stored is None:
            return (
                "KonPro does not return the signing secret of the endpoint kept, and none is "
                "stored (the answer to its registration was lost, or the volume that kept it): "
                "signatures cannot be checked; set konpro.webhook_secret to that endpoint's "
                "secret"
            )
        if stored.endpoint_id in {endpoint_id, None}:
            return None  # its secret; or stored by a version that did not note whose it is
        return (
            f"the stored signing secret is endpoint {stored.endpoint_id}'s, not the kept endpoint "
            f"{endpoint_id}'s (it was deleted, or moved to another URL), and KonPro does not "
            "return the secret of the endpoint kept: its deliveries are refused (401); set "
            "konpro.webhook_secret to that endpoint's secret"
        )

    def _report_unverifiable(self, endpoint_id: str | None, error: str | None) -> None:
        """One error line for each endpoint whose deliveries will be refused, not one per run."""
        if error is None:
            self._unverifiable_reported_for = None
        elif self._unverifiable_reported_for != endpoint_id:
            self._unverifiable_reported_for = endpoint_id
            log.error("reconcile.secret_mismatch", endpoint_id=endpoint_id, error=error)

    async def _check_event_names(self) -> None:
        """Warn once about configured event types KonPro does not list; they may be new."""
        if self._events_checked or self._desired.events is None:
            return
        try:
            known = set(await self._client.list_event_types())
        except KonProError as exc:
            if exc.retryable or isinstance(exc, AuthenticationError):
                raise  # KonPro is down, asks to wait, or refuses the key: the run ends
            # Refused, or an unknown shape: asking again will not help.
            log.warning("reconcile.event_types_unchecked", error=str(exc))
            self._events_checked = True
            return
        self._events_checked = True
        if unknown := sorted(set(self._desired.events) - known):
            log.warning(
                "reconcile.unknown_event_types",
                unknown=unknown,
                known=sorted(known),
                hint="check konpro.events; KonPro may refuse to register them",
            )

    async def _register(self, action: Action, done: list[Action]) -> Endpoint:
        """Add the endpoint, and keep its signing secret: this answer is the only time KonPro
        tells it (``endpoint.list`` may answer ``null``), so a stop lets it finish."""
        added = await self._client.add_endpoint(action.url, action.events)
        log.info("reconcile.endpoint_added", endpoint_id=added.endpoint_id, url=action.url)
        done.append(action)
        await self._sync_secret(added.endpoint_id, added.secret)
        return added

    def _registration_failed_at_stop(self, exc: Exception) -> None:
        """A registration let finish during a stop failed: said as ``run_once`` would say it."""
        if isinstance(exc, OSError):
            self._say_not_stored(exc)
        else:
            log.warning("reconcile.failed", error=str(exc), error_type=type(exc).__name__)

    def _say_not_stored(self, exc: OSError) -> None:
        log.error("reconcile.secret_store_failed", path=str(self._secret_dir), error=str(exc))

    async def _apply(self, action: Action) -> None:
        """Carry out one write other than a registration."""
        assert action.endpoint_id is not None  # only ADD has no endpoint yet
        if action.kind is ActionKind.UPDATE:
            await self._client.update_endpoint(
                action.endpoint_id, url=action.new_url, events=action.events
            )
            log.info(
                "reconcile.endpoint_updated",
                endpoint_id=action.endpoint_id,
                events=_describe_events(action.events),
                **({"url": action.new_url} if action.new_url else {}),
            )
        elif action.kind is ActionKind.DELETE:
            await self._delete_duplicate(action)
        else:
            _report_disabled(action)

    async def _delete_duplicate(self, action: Action) -> None:
        endpoint_id = action.endpoint_id
        assert endpoint_id is not None
        try:
            await self._client.delete_endpoint(endpoint_id)
        except (NotFound, ValidationFailed) as exc:
            # Another replica deleted it first: the goal is met. KonPro's answer for an id it
            # does not have is not documented (a 404, or the 400 of an invalid parameter), so
            # a refusal is checked against the list.
            if isinstance(exc, ValidationFailed) and await self._still_listed(endpoint_id):
                raise
            log.info("reconcile.duplicate_already_gone", endpoint_id=endpoint_id)
            return
        log.info("reconcile.duplicate_deleted", endpoint_id=endpoint_id, url=action.url)

    @staticmethod
    def _verified(actions: list[Action]) -> ResultKind:
        """The verify-mode verdict on the writes repair would make: reported, none made."""
        for action in actions:
            if action.kind is ActionKind.REPORT_DISABLED:
                _report_disabled(action)
            else:
                log.warning("reconcile.drift", would=str(action), mode="verify")
        kind: ResultKind = _summary(actions)
        return kind if kind in {"ok", "disabled"} else "drift"

    async def _sync_secret(self, endpoint_id: str | None, secret: SecretStr | None) -> None:
        """Keep the kept endpoint's signing secret on disk unless the operator configured one
        (or KonPro does not tell it: ``_secret_outdated`` says what that means)."""
        value = secret.get_secret_value() if secret is not None else ""
        if self._configured_secrets or not value or endpoint_id is None:
            return
        stored = await asyncio.to_thread(load_stored, self._secret_dir)
        if stored is not None and stored.value == value:
            if stored.endpoint_id != endpoint_id:
                await asyncio.to_thread(store_secret, self._secret_dir, value, endpoint_id)
            return
        path = await asyncio.to_thread(store_secret, self._secret_dir, value, endpoint_id)
        self._stored_this_run = True
        log.warning(
            "reconcile.secret_stored",
            path=str(path),
            hint="konpro.webhook_secret is not set; the endpoint's signing secret was kept in "
            "this file. Set konpro.webhook_secret explicitly",
        )

    async def _still_listed(self, endpoint_id: str) -> bool:
        endpoints = await self._client.list_endpoints()
        return any(endpoint.endpoint_id == endpoint_id for endpoint in endpoints)

    def _failed(self, exc: KonProError, done: list[Action]) -> ReconcileResult:
        # What the next run waits for follows this failure, not an earlier run's: after a
        # refused key, a 429 still asks to wait, and a 503 still calls for back-off.
        self._retry_after = exc.retry_after if isinstance(exc, RateLimited) else 0.0
        self._secret_unverifiable = False  # this run ended before the secret could be checked
        error = _explain(exc, self._desired)
        refused_key = isinstance(exc, AuthenticationError)
        if refused_key and not self._auth_reported:  # one line until a run gets through
            log.error("reconcile.authentication_failed", error=error)
            self._auth_reported = True
        self._auth_failing = refused_key
        if not refused_key:
            log.warning("reconcile.failed", error=error, error_type=type(exc).__name__)
        return _result(
            "error", error=error, actions=tuple(done), secret_stored=self._stored_this_run
        )


def _secret_of(endpoint: Endpoint | None) -> SecretStr | None:
    return endpoint.secret if endpoint is not None else None


def _ours(endpoints: Sequence[Endpoint], desired: Desired) -> list[Endpoint]:
    target = normalize_url(desired.url)
    return [endpoint for endpoint in endpoints if normalize_url(endpoint.url) == target]


def _seniority(endpoint: Endpoint) -> tuple[bool, datetime, str]:
    created = endpoint.created_at or datetime.max.replace(tzinfo=UTC)
    return (not endpoint.enabled, created, endpoint.endpoint_id)


_PRECEDENCE: Final[tuple[tuple[ActionKind, ResultKind], ...]] = (
    (ActionKind.REPORT_DISABLED, "disabled"),
    (ActionKind.ADD, "added"),
    (ActionKind.DELETE, "deduplicated"),
    (ActionKind.UPDATE, "updated"),
)


def _summary(actions: Sequence[Action]) -> ResultKind:
    """One word for a run: the action an operator most needs to hear about."""
    kinds = {action.kind for action in actions}
    return next((result for kind, result in _PRECEDENCE if kind in kinds), "ok")


def _explain(exc: KonProError, desired: Desired) -> str:
    """The error, with what an operator should do about it."""
    if isinstance(exc, AuthenticationError):
        return f"KonPro refused the API key (konpro.api_key): {exc}"
    if isinstance(exc, ValidationFailed) and exc.call in {"endpoint.add", "endpoint.update"}:
        return (
            f"KonPro would not register {desired.url}: {exc}. Check that the URL is reachable "
            "from KonPro and answers OPTIONS with 2xx within 1 second, and that konpro.events "
            "names event types KonPro knows (konpro-bridge events)"
        )
    return str(exc)


def _report_disabled(action: Action) -> None:
    log.error(
        "reconcile.endpoint_disabled",
        endpoint_id=action.endpoint_id,
        url=action.url,
        hint="KonPro disabled this endpoint and its API cannot re-enable it: "
        "enable it in the KonPro dashboard; no events are delivered meanwhile",
    )


def _result(
    kind: ResultKind,
    *,
    endpoint_id: str | None = None,
    error: str | None = None,
    actions: tuple[Action, ...] = (),
    secret_stored: bool = False,
) -> ReconcileResult:
    return ReconcileResult(datetime.now(UTC), kind, endpoint_id, error, actions, secret_stored)


def _fields(result: ReconcileResult) -> dict[str, Any]:
    return {
        "result": result.kind,
        "endpoint_id": result.endpoint_id,
        "actions": [str(action) for action in result.actions],
    }


def _notify(on_result: Callable[[ReconcileResult], object], result: ReconcileResult) -> None:
    try:
        on_result(result)
    except Exception:
        log.exception("reconcile.on_result_failed")


def _describe_events(events: Sequence[str] | None) -> str:
    return "all" if events is None else ",".join(events)


def _jittered(seconds: float) -> float:
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)
