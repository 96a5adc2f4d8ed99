from __future__ import annotations

import threading

import pytest

from tuneloop.redact import Redactor, iban_valid, luhn_valid


@pytest.mark.parametrize(("text", "expected", "kinds"), [
    ("mail me at jane.doe.check@example.com", "mail me at [EMAIL]", {"email": 1}),
    ("call +1 415 555 0199 or (415) 555-0199", "call [PHONE] or [PHONE]", {"phone": 2}),
    ("card 4111 1111 1111 1111 please", "card [CARD] please", {"card": 1}),
    ("IBAN DE89 3704 0044 0532 0130 00 thanks", "IBAN [IBAN] thanks", {"iban": 1}),
    ("flight UA 5678 on 2018-05-02, order 20181101", "flight UA 5678 on 2018-05-02, order 20181101", {}),
    ("@united gate 12 at 5pm", "@united gate 12 at 5pm", {}),
])
def test_redaction(text: str, expected: str, kinds: dict[str, int]) -> None:
    redactor = Redactor()
    clean, found = redactor.redact(text)
    assert clean == expected
    assert dict(found) == kinds
    assert dict(redactor.counts) == kinds


def test_checksums() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE00 3704 0044 0532 0130 00")


def test_only_configured_kinds_are_redacted() -> None:
    clean, _ = Redactor(["email"]).redact("a@b.com +1 415 555 0199")
    assert clean == "[EMAIL] +1 415 555 0199"
    with pytest.raises(ValueError, match="unknown PII kinds"):
        Redactor(["ssn"])


@pytest.mark.parametrize("text", ["a" * 2_000_000, "a." * 1_000_000, "a@" * 1_000_000, "1 " * 1_000_000,
                                  "(12) " * 400_000], ids=["letters", "dotted", "ats", "spaced-digits", "phone-ish"])
def test_hostile_text_of_the_largest_body_finishes(text: str) -> None:
    """The e-mail pattern before this was quadratic on a run without `@`: 2 MB of letters would have held the
    interpreter for tens of minutes. The guard is a hang detector, not a timing assertion: linear work takes about
    a second here, and the old pattern would still be running when the generous deadline passes."""
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(Redactor().redact(text)[0]), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert done == [text], "redaction of 2 MB did not finish (or changed text that holds no PII)"


def test_the_bounded_email_pattern_still_finds_addresses_at_the_rfc_limits() -> None:
    local, label = "x" * 64, "d" * 63
    clean, found = Redactor(["email"]).redact(f"to {local}@{label}.example.com and b@c.io")
    assert clean == "to [EMAIL] and [EMAIL]" and found["email"] == 2
