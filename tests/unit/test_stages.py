"""Pure gate stages: token bucket, sampling, dedup keys and window, PII redaction."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_processors.dedup import client_pseudonym, dedup_key, opinion_key, seen_step
from stream_processors.ratelimit import RateLimit, take_token
from stream_processors.redact import pseudonymize, redact_payload, redact_text
from stream_processors.sample import keep, sample_rate_for

# --- token bucket -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 50),
    burst=st.integers(1, 100),
    gaps=st.lists(st.floats(0, 5), min_size=1, max_size=300),
)
def test_bucket_never_allows_more_than_capacity_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limit = RateLimit(rate_per_s=rate, burst=burst)
    state, now, allowed = None, 1000.0, 0
    for gap in gaps:
        now += gap
        state, ok = take_token(state, now, limit)
        allowed += ok
    assert allowed <= burst + rate * (now - 1000.0) + 1e-9


def test_bucket_default_is_sixty_per_minute_with_refill() -> None:
    limit = RateLimit.per_minute(60)
    state = None
    results = []
    for _ in range(61):
        state, ok = take_token(state, 0.0, limit)
        results.append(ok)
    assert results.count(True) == 60 and results[-1] is False
    state, ok = take_token(state, 1.0, limit)  # one second refills one token
    assert ok
    state, ok = take_token(state, 1.0, limit)
    assert not ok


def test_bucket_ignores_time_going_backwards() -> None:
    limit = RateLimit(rate_per_s=1, burst=1)
    state, _ = take_token(None, 100.0, limit)
    state, ok = take_token(state, 50.0, limit)
    assert not ok and state.updated_s == 100.0


# --- sampling ------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(rate=st.floats(0.05, 0.95), seed=st.integers(0, 10_000))
def test_sampling_rate_is_observed_and_replays_decide_the_same(rate: float, seed: int) -> None:
    ids = [f"{seed}-{i}" for i in range(4000)]
    first = [keep(i, rate) for i in ids]
    assert first == [keep(i, rate) for i in ids]
    observed = sum(first) / len(ids)
    # 4000 Bernoulli draws: 5 standard deviations is well under 0.04.
    assert abs(observed - rate) < 0.04


def test_vetoes_and_safety_are_never_sampled_away() -> None:
    rates = {"veto": 0.0, "safety": 0.0, "thumbs": 0.25}
    assert sample_rate_for("veto", rates) == 1.0
    assert sample_rate_for("safety", rates) == 1.0
    assert sample_rate_for("thumbs", rates) == 0.25
    assert sample_rate_for("rating", rates) == 1.0
    assert not keep("x", 0.0) and keep("x", 1.0)


# --- dedup ---------------------------------------------------------------------


def test_dedup_key_precedence_and_keying() -> None:
    base = {"source": "s", "type": "thumbs", "hash": "h1", "interaction_id": None, "idempotency_key": None}
    key = b"k" * 32

    def keyed(text: str) -> str:
        return text[:2] + hashlib.blake2b(text.encode(), key=key, digest_size=16, person=b"dedup").hexdigest()

    # A resend repeats the idempotency key, else the content: an explicit signal is no exception.
    assert dedup_key({**base, "idempotency_key": "k", "interaction_id": "i"}, key) == keyed("k:s:k")
    assert dedup_key({**base, "interaction_id": "i", "user_id": "u1"}, key) == keyed("h:h1")
    assert dedup_key({**base, "type": "latency", "interaction_id": "i"}, key) == keyed("h:h1")
    assert dedup_key(base, key) == keyed("h:h1")
    # Another key, another dedup key: nothing in the table can be recomputed without the key.
    assert dedup_key(base, b"x" * 32) != dedup_key(base, key)
    assert "h1" not in dedup_key(base, key)


def test_opinion_key_names_interaction_rater_and_type() -> None:
    base = {"source": "s", "type": "thumbs", "hash": "h1", "interaction_id": "i", "idempotency_key": "k"}
    key = b"k" * 32

    def keyed(text: str) -> str:
        return text[:2] + hashlib.blake2b(text.encode(), key=key, digest_size=16, person=b"dedup").hexdigest()

    assert opinion_key(base, key) == keyed("o:i:c=s:thumbs")  # rater: the client (the source)
    # The rater is the user, else the session, else the client: two raters, two opinions.
    assert opinion_key({**base, "user_id": "u1"}, key) == keyed("o:i:u=u1:thumbs")
    assert opinion_key({**base, "user_id": "u2"}, key) != keyed("o:i:u=u1:thumbs")
    assert opinion_key({**base, "session_id": "s9"}, key) == keyed("o:i:s=s9:thumbs")
    assert opinion_key({**base, "client_ip": "10.0.0.1"}, key) == keyed("o:i:c=10.0.0.1:thumbs")
    assert opinion_key({**base, "type": "rating"}, key) != opinion_key(base, key)
    # Not an explicit signal, or no interaction: no opinion to revise.
    assert opinion_key({**base, "type": "latency"}, key) is None
    assert opinion_key({**base, "interaction_id": None}, key) is None
    assert client_pseudonym({**base, "client_ip": "10.0.0.1"}, key) != client_pseudonym(base, key)
    assert "10.0.0.1" not in client_pseudonym({**base, "client_ip": "10.0.0.1"}, key)


def test_seen_window() -> None:
    expiry, dup = seen_step(None, 100.0, 60.0)
    assert (expiry, dup) == (160.0, False)
    assert seen_step(expiry, 159.0, 60.0) == (160.0, True)
    assert seen_step(expiry, 160.0, 60.0) == (220.0, False)


# --- redaction -----------------------------------------------------------------

_local = st.text("abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=20).filter(
    lambda s: s[0].isalnum() and s[-1].isalnum()
)
_domain = st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12), min_size=1, max_size=3)
_tlds = st.sampled_from(["com", "org", "io", "co.uk", "ch"])
_emails = st.builds(lambda local, d, tld: f"{local}@{'.'.join(d)}.{tld}", _local, _domain, _tlds)
_phones = st.one_of(
    st.builds(
        lambda cc, a, b, c: f"+{cc} {a} {b} {c}",
        st.integers(1, 99),
        st.integers(10, 999),
        st.integers(100, 999),
        st.integers(1000, 9999),
    ),
    st.builds(lambda a, b, c: f"({a}) {b}-{c}", st.integers(200, 999), st.integers(200, 999), st.integers(1000, 9999)),
    st.builds(lambda a, b, c: f"{a}-{b}-{c}", st.integers(200, 999), st.integers(200, 999), st.integers(1000, 9999)),
    st.builds(lambda a, b, c: f"0{a} {b} {c}", st.integers(10, 999), st.integers(100, 9999), st.integers(1000, 9999)),
)
_filler = st.sampled_from(["", "hi ", "contact: ", "see ", "(", "tel. "])


@settings(max_examples=300, deadline=None)
@given(email=_emails, phone=_phones, before=_filler, after=st.sampled_from(["", " thanks", ".", ", ok", ")"]))
def test_generated_emails_and_phones_never_survive(email: str, phone: str, before: str, after: str) -> None:
    text = f"{before}{email} and {phone}{after}"
    out = redact_text(text)
    assert email not in out
    assert phone not in out
    assert "[EMAIL]" in out and "[PHONE]" in out


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("4111 1111 1111 1111", "CARD"),
        ("5500-0000-0000-0004", "CARD"),
        ("DE89 3704 0044 0532 0130 00", "IBAN"),
        ("GB82WEST12345698765432", "IBAN"),
        ("192.168.1.20", "IP"),
        ("2001:db8::8a2e:370:7334", "IP"),
        ("123-45-6789", "SSN"),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl", "JWT"),
        ("Authorization: Bearer abcdefghijklmnop123", "TOKEN"),
        ("sk-proj-abcdefghijklmnopqrstuv", "SECRET"),
        ("AKIAABCDEFGHIJKLMNOP", "SECRET"),
        ("api_key=abcdef123456", "SECRET"),
    ],
)
def test_each_kind_is_found(text: str, kind: str) -> None:
    counts: Counter[str] = Counter()
    out = redact_text(f"x {text} y", counts)
    assert f"[{kind}]" in out
    assert counts[kind] == 1


@pytest.mark.parametrize(
    "text",
    [
        "version 1.2.3.4",
        "upgrade to v2.10.1 today",
        "on 2026-11-23 at 10:30:00",
        "2026-11-23T10:30:00Z",
        "it costs $1,234.56 or 1.234,56 EUR",
        "order #4111111111111111",
        "ISBN 978-3-16-148410-0",
        "9783161484100",
        "4111 1111 1111 1112",  # fails the Luhn check
        "DE00 3704 0044 0532 0130 00",  # fails the IBAN check
        "ticket 123-45-6789",
    ],
)
def test_lookalikes_are_not_mangled(text: str) -> None:
    assert redact_text(text) == text


def test_payload_strings_are_redacted_everywhere_and_counted() -> None:
    counts: Counter[str] = Counter()
    payload = {
        "text": "reach me at a@b.io",
        "comment": "or +1 415 555 0132",
        "corrected_response": None,
        "extra": {"note": "card 4111 1111 1111 1111", "stars": 4, "ok": True},
    }
    out = redact_payload(payload, counts)
    assert out["text"] == "reach me at [EMAIL]"
    assert out["comment"] == "or [PHONE]"
    assert out["extra"] == {"note": "card [CARD]", "stars": 4, "ok": True}
    assert counts == Counter({"EMAIL": 1, "PHONE": 1, "CARD": 1})
    assert payload["text"] == "reach me at a@b.io"  # the input is not modified


def test_pseudonyms_are_stable_keyed_and_not_the_input() -> None:
    a = pseudonymize("user-1", b"key-1")
    assert a == pseudonymize("user-1", b"key-1")
    assert a != pseudonymize("user-1", b"key-2")
    assert a != pseudonymize("user-2", b"key-1")
    assert "user-1" not in a
