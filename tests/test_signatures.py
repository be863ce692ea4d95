"""Which deliveries the bridge believes came from KonPro, and which it has already published."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from bridge.signatures import Authenticator, ReplayGuard, SignatureRejected, SignatureVerifier, sign

SECRET = "whsec_current"
OLD_SECRET = "whsec_retiring"
BODY = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}}'
NOW = 1_700_000_000.0
TOLERANCE = 300.0


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verifier(*secrets: str) -> SignatureVerifier:
    return SignatureVerifier(
        secrets or (SECRET,), timestamp_tolerance=TOLERANCE, clock=FakeClock(NOW)
    )


def reason(body: bytes, headers: dict[str, str], *secrets: str) -> str:
    with pytest.raises(SignatureRejected) as excinfo:
        verifier(*secrets).verify(body, headers)
    return excinfo.value.reason


def test_sign_is_lowercase_hex_hmac_sha256_keyed_with_the_whole_secret() -> None:
    # printf %s hello | openssl dgst -sha256 -hmac whsec_x
    expected = "1c7d3692ce8ced7295d06f7a6e02cddd5b50a8dcc894aca414d32e35cc3d6921"
    assert sign(b"hello", "whsec_x") == expected


@pytest.mark.parametrize("header", ["KonPro-Signature", "Signature"])
def test_either_signature_header_is_accepted(header: str) -> None:
    verifier().verify(BODY, {header: sign(BODY, SECRET)})


@pytest.mark.parametrize("header", ["konpro-signature", "SIGNATURE"])
def test_header_names_are_case_insensitive_with_aiohttp_headers(header: str) -> None:
    verifier().verify(BODY, CIMultiDict({header: sign(BODY, SECRET)}))


def test_lowercased_header_names_work_in_a_plain_dict() -> None:
    verifier().verify(BODY, {"konpro-signature": sign(BODY, SECRET)})


def test_uppercase_hex_is_accepted() -> None:
    verifier().verify(BODY, {"Signature": sign(BODY, SECRET).upper()})


def test_an_unsigned_delivery_is_rejected() -> None:
    assert reason(BODY, {}) == "missing signature"
    assert reason(BODY, {"Signature": ""}) == "missing signature"


def test_a_wrong_signature_is_rejected() -> None:
    assert reason(BODY, {"Signature": sign(BODY, "whsec_other")}) == "signature mismatch"


def test_the_signature_of_another_body_is_rejected() -> None:
    other = BODY.replace(b"v1", b"v2")
    assert reason(BODY, {"Signature": sign(other, SECRET)}) == "signature mismatch"


@pytest.mark.parametrize(
    "value",
    ["not-hex", "ab" * 31, "ab" * 33, "z" * 64, "ab " * 21 + "a", sign(BODY, SECRET) + "0"],
)
def test_a_signature_that_is_not_64_hex_digits_is_rejected_as_malformed(value: str) -> None:
    assert reason(BODY, {"Signature": value}) == "malformed signature"


def test_every_secret_in_rotation_is_accepted_and_no_other() -> None:
    both = (SECRET, OLD_SECRET)
    verifier(*both).verify(BODY, {"Signature": sign(BODY, SECRET)})
    verifier(*both).verify(BODY, {"Signature": sign(BODY, OLD_SECRET)})
    third = {"Signature": sign(BODY, "whsec_third")}
    assert reason(BODY, third, *both) == "signature mismatch"


def test_at_least_one_secret_is_required() -> None:
    with pytest.raises(ValueError, match="secret"):
        SignatureVerifier((), timestamp_tolerance=TOLERANCE)


@pytest.mark.parametrize("offset", [0.0, TOLERANCE, -TOLERANCE])
def test_a_timestamp_within_tolerance_either_way_is_accepted(offset: float) -> None:
    headers = {"Signature": sign(BODY, SECRET), "KonPro-Timestamp": str(int(NOW + offset))}
    verifier().verify(BODY, headers)


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (-TOLERANCE - 60, "stale timestamp: sent 360 s ago, konpro.timestamp_tolerance is 300 s"),
        (TOLERANCE + 60, "future timestamp: 360 s ahead, konpro.timestamp_tolerance is 300 s"),
    ],
)
def test_a_timestamp_beyond_tolerance_either_way_is_rejected_saying_by_how_much(
    offset: float, expected: str
) -> None:
    """The skew tells a clock that drifted (fix NTP) from a capture replayed days later."""
    headers = {"Signature": sign(BODY, SECRET), "KonPro-Timestamp": str(int(NOW + offset))}
    assert reason(BODY, headers) == expected


@pytest.mark.parametrize("value", ["yesterday", "nan", "inf", "-inf"])
def test_a_malformed_timestamp_is_rejected(value: str) -> None:
    headers = {"Signature": sign(BODY, SECRET), "KonPro-Timestamp": value}
    assert reason(BODY, headers) == "malformed timestamp"


def test_the_signature_is_checked_before_the_timestamp() -> None:
    headers = {"Signature": sign(BODY, "whsec_other"), "KonPro-Timestamp": "0"}
    assert reason(BODY, headers) == "signature mismatch"


@given(body=st.binary(max_size=4096), secret=st.text(min_size=1))
def test_whatever_sign_produces_verify_accepts(body: bytes, secret: str) -> None:
    SignatureVerifier([secret], timestamp_tolerance=TOLERANCE).verify(
        body, {"KonPro-Signature": sign(body, secret)}
    )


def test_replay_guard_has_seen_an_event_only_after_it_is_remembered() -> None:
    guard = ReplayGuard(window=60, max_entries=10)
    assert not guard.seen("evt_1")
    guard.remember("evt_1")
    assert guard.seen("evt_1")
    assert not guard.seen("evt_2")


def test_replay_guard_forgets_an_event_once_its_window_has_passed() -> None:
    clock = FakeClock()
    guard = ReplayGuard(window=60, max_entries=10, clock=clock)
    guard.remember("evt_1")
    clock.now = 59.9
    assert guard.seen("evt_1")
    clock.now = 60.0
    assert not guard.seen("evt_1")
    assert len(guard) == 0


def test_remembering_an_event_again_restarts_its_window() -> None:
    clock = FakeClock()
    guard = ReplayGuard(window=60, max_entries=10, clock=clock)
    guard.remember("evt_1")
    clock.now = 50
    guard.remember("evt_1")
    clock.now = 100
    assert guard.seen("evt_1")


def test_replay_guard_is_bounded_and_forgets_the_oldest_first() -> None:
    clock = FakeClock()
    guard = ReplayGuard(window=60, max_entries=3, clock=clock)
    for n in range(5):
        clock.now = n
        guard.remember(f"evt_{n}")
    assert len(guard) == 3
    assert [guard.seen(f"evt_{n}") for n in range(5)] == [False, False, True, True, True]


@pytest.mark.parametrize(("window", "max_entries"), [(0, 10), (60, 0)])
def test_replay_guard_with_a_zero_setting_is_disabled(window: float, max_entries: int) -> None:
    guard = ReplayGuard(window=window, max_entries=max_entries)
    guard.remember("evt_1")
    assert not guard.enabled
    assert not guard.seen("evt_1")
    assert len(guard) == 0


def rejection(verify: Authenticator, body: bytes, headers: dict[str, str]) -> str:
    with pytest.raises(SignatureRejected) as excinfo:
        verify.verify(body, headers)
    return excinfo.value.reason


def test_a_secret_learnt_again_replaces_the_one_learnt_before() -> None:
    """A new registration (``endpoint.add`` after the endpoint was lost) revokes the old
    secret and KonPro signs with the new one from then on: the bridge must take the new one,
    or every genuine delivery is refused 401 until a restart."""
    authenticator = Authenticator([], timestamp_tolerance=300)
    authenticator.learn_secret("whsec_first_registration")
    authenticator.learn_secret("whsec_second_registration")

    authenticator.verify(BODY, {"KonPro-Signature": sign(BODY, "whsec_second_registration")})
    old = {"KonPro-Signature": sign(BODY, "whsec_first_registration")}
    assert rejection(authenticator, BODY, old) == "signature mismatch"


def test_the_configured_secret_still_passes_once_one_is_learnt() -> None:
    """The configured secrets stay for the process's life (README: the bridge checks against
    ``konpro.webhook_secret``, ``previous_webhook_secrets`` *or* the learnt one): learning a
    secret must not turn away deliveries signed with the configured one."""
    authenticator = Authenticator([SECRET], timestamp_tolerance=300)
    authenticator.learn_secret("whsec_learnt_at_run_time")

    authenticator.verify(BODY, {"KonPro-Signature": sign(BODY, SECRET)})
    authenticator.verify(BODY, {"KonPro-Signature": sign(BODY, "whsec_learnt_at_run_time")})


def test_a_signature_with_spaces_between_its_hex_digits_is_malformed() -> None:
    """``bytes.fromhex`` skips spaces: the signature must be exactly 64 hex digits, else it is
    told apart in the log as ``malformed signature`` (a proxy or client mangling the header),
    not ``signature mismatch`` (a wrong secret), which sends the operator the wrong way."""
    authenticator = Authenticator([SECRET], timestamp_tolerance=300)
    good = sign(BODY, SECRET)
    spaced = " ".join(good[i : i + 2] for i in range(0, len(good), 2))  # 95 characters
    assert rejection(authenticator, BODY, {"KonPro-Signature": spaced}) == "malformed signature"
    short = "ab " * 16 + "ab" * 8  # 64 characters, 24 bytes
    assert rejection(authenticator, BODY, {"KonPro-Signature": short}) == "malformed signature"


def test_the_replay_memory_forgets_the_least_recently_taken_body_first() -> None:
    """A body remembered again (told by a sibling worker after this one took it too) starts its
    window again and moves to the back of the memory: when the memory is full, the oldest goes,
    not the freshest, which a replay could then get onto the bus again."""
    clock = FakeClock()
    guard = ReplayGuard(window=60, max_entries=2, clock=clock)
    guard.remember("a")
    clock.now = 1
    guard.remember("b")
    clock.now = 2
    guard.heard("a")  # a sibling took it too
    clock.now = 3
    guard.remember("c")  # full: "b" is the oldest
    assert [guard.seen(key) for key in ("a", "b", "c")] == [True, False, True]


def test_a_body_remembered_again_does_not_hold_older_ones_past_their_window() -> None:
    """Expiry walks the memory oldest first: a body remembered again must not keep the ones
    behind it (taken earlier) beyond their window."""
    clock = FakeClock()
    guard = ReplayGuard(window=60, max_entries=10, clock=clock)
    guard.remember("a")
    clock.now = 10
    guard.remember("b")
    clock.now = 50
    guard.heard("a")
    clock.now = 75  # "b" is 65 s old, "a" 25 s
    assert not guard.seen("b")
    assert guard.seen("a")
