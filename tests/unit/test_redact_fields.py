"""What the redactor finds (every family the review named) and which fields it covers."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from stream_processors.redact import ID_FIELDS, TEXT_KEYS, guard_text, redact_event, redact_payload, redact_text


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("415 555 0132", "PHONE"), ("4155550132", "PHONE"), ("1-800-555-0199", "PHONE"),
        ("+1 (415) 555-0132", "PHONE"), ("07700 900123", "PHONE"), ("+44 7700 900123", "PHONE"),
        ("030 12345678", "PHONE"), ("+49 30 12345678", "PHONE"), ("01 23 45 67 89", "PHONE"),
        ("+33 6 12 34 56 78", "PHONE"), ("+91 98765 43210", "PHONE"), ("(11) 91234-5678", "PHONE"),
        ("03-1234-5678", "PHONE"), ("+81 90 1234 5678", "PHONE"), ("(02) 9876 5432", "PHONE"),
        ("0412 345 678", "PHONE"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0abc+/=\n-----END RSA PRIVATE KEY-----", "SECRET"),
        ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "SECRET"),
        ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV", "SECRET"),
        ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "SECRET"), ("gho_abcdefghijklmnopqrstuvwxyz0123456789", "SECRET"),
        ("xapp-1-A0123456789-1234567890123-abcdef0123456789", "SECRET"),
        ("xoxb-123456789012-1234567890123-abcdefghijklmnop", "SECRET"),
        ("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", "SECRET"),
        ("whsec_abcdefghijklmnopqrstuvwxyz012345", "SECRET"), ("sk_live_abcdefghijklmnopqrstuvwx", "SECRET"),
        ("ya29.a0AfH6SMBabcdefghijklmnopqrstuvwxyz", "SECRET"),
        ("john dot doe at example dot com", "EMAIL"), ("john [at] example [dot] com", "EMAIL"),
        ("josé.garcía@exämple.de", "EMAIL"), ("用户@例子.广告", "EMAIL"), ("राम@उदाहरण.भारत", "EMAIL"),
    ],
)  # fmt: skip
def test_each_family_the_review_found_missing_is_caught(text: str, kind: str) -> None:
    counts: Counter[str] = Counter()
    out = redact_text(f"see {text} ok", counts)
    assert out == f"see [{kind}] ok"
    assert counts == Counter({kind: 1})


def test_a_word_ending_in_v_no_longer_hides_what_follows() -> None:
    assert redact_text("Igor Petrov: 123-45-6789") == "Igor Petrov: [SSN]"
    assert redact_text("Ivanov 415 555 0132") == "Ivanov [PHONE]"
    assert redact_text("v 123-45-6789") == "v 123-45-6789"  # "v" as a word still reads as a version


def test_a_connection_string_loses_user_and_password_and_keeps_the_host() -> None:
    out = redact_text("DATABASE_URL=postgres://admin:s3cr3t@db.example.com:5432/app")
    assert out == "DATABASE_URL=postgres://[SECRET]@db.example.com:5432/app"


def test_the_old_quadratic_input_is_redacted_quickly_and_correctly() -> None:
    text = "a." * 32_000 + "@"
    assert redact_text(text) == text


def event(**fields: Any) -> dict[str, Any]:
    base = {
        "event_id": "e1", "source": "ui", "type": "thumbs",
        "payload": {"text": None, "comment": None, "corrected_response": None, "extra": {}},
        "tags": [], "session_id": None, "idempotency_key": None,
    }  # fmt: skip
    return {**base, **fields}


def test_map_keys_tags_session_and_idempotency_key_are_redacted() -> None:
    counts: Counter[str] = Counter()
    record = event(
        payload={"text": None, "comment": None, "corrected_response": None,
                 "extra": {"alice@example.com": "up", "bob@example.com": 1, "note": "ok"}},
        tags=["vip", "415 555 0132"], session_id="s:alice@example.com", idempotency_key="k:415 555 0132",
    )  # fmt: skip
    out = redact_event(record, counts)
    assert out["payload"]["extra"] == {"[EMAIL]": "up", "[EMAIL]#2": 1, "note": "ok"}
    assert out["tags"] == ["vip", "[PHONE]"]
    assert out["session_id"] == "s:[EMAIL]"
    assert out["idempotency_key"] == "k:[PHONE]"
    assert counts == Counter({"EMAIL": 3, "PHONE": 2})
    assert record["tags"] == ["vip", "415 555 0132"]  # the input is not modified
    assert set(ID_FIELDS) == {"session_id", "idempotency_key"}


def test_with_a_key_ids_holding_pii_become_distinct_pseudonyms() -> None:
    a = redact_event(event(session_id="alice@example.com"), pseudonym_key=b"k")["session_id"]
    b = redact_event(event(session_id="bob@example.com"), pseudonym_key=b"k")["session_id"]
    assert a != b and a.startswith("p_") and "example" not in a
    assert redact_event(event(session_id="s-1"), pseudonym_key=b"k")["session_id"] == "s-1"


def test_redact_payload_redacts_map_keys_too() -> None:
    out = redact_payload({"text": None, "comment": None, "corrected_response": None, "extra": {"a@b.io": "x"}})
    assert out["extra"] == {"[EMAIL]": "x"}


def test_the_text_guard_drops_every_free_text_key_unless_text_is_allowed() -> None:
    payload = {"text": "t", "comment": "c", "corrected_response": None,
               "extra": {"prompt": "p", "Response": "r", "output": "o", "completion": "x", "stars": 4}}  # fmt: skip
    out, dropped = guard_text(payload, allow_text=False)
    assert dropped
    assert out == {"text": None, "comment": "c", "corrected_response": None, "extra": {"stars": 4}}
    assert guard_text(payload, allow_text=True) == (payload, False)
    clean = {"text": None, "comment": "c", "corrected_response": None, "extra": {"stars": 4}}
    assert guard_text(clean, allow_text=False) == (clean, False)
    # track() sends prompt and response snapshots only when text is allowed: the same keys here.
    assert {"prompt", "response", "output", "completion", "text"} <= TEXT_KEYS


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("電話番号は03-1234-5678です", "電話番号は[PHONE]です"),  # CJK touches the number
        ("联系13812345678谢谢", "联系[PHONE]谢谢"),
        ('{"k": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIB+/=\\n-----END PRIVATE KEY-----"}', '{"k": "[SECRET]"}'),
        ("call 415-555-0132 x123 now", "call [PHONE] now"),
        ("0049 30 12345678", "[PHONE]"),
        ("my SSN is 123 45 6789", "my SSN is [SSN]"),
        ("social security number: 123456789", "social security number: [SSN]"),
        ("john @ example . com", "[EMAIL]"),
        ("mysql://root:p%40ss!w0rd@10.0.0.5/db", "mysql://[SECRET]@[IP]/db"),
    ],
)
def test_harder_forms(text: str, redacted: str) -> None:
    assert redact_text(text) == redacted


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1 is local", "0.0.0.0 binds all", "1.2.3.4-beta", "電話番号はorder id: 7126834208です", "the ssn field"],
)
def test_harder_lookalikes(text: str) -> None:
    assert redact_text(text) == text
