from __future__ import annotations

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
