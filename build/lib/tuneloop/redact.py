"""PII redaction applied to every prompt and completion before it is stored.

Kinds: e-mail addresses, phone numbers, payment card numbers (only digit runs that pass the Luhn check, so order
numbers and flight numbers survive) and IBANs (mod-97 checked). Each match becomes `[EMAIL]`, `[PHONE]`, `[CARD]`
or `[IBAN]`, and the counts per kind are returned for the gateway's metrics.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

PII_KINDS = ("email", "card", "iban", "phone")

# Every pattern does bounded work per position, so a 2 MB prompt costs linear time. The e-mail pattern starts only
# where a run of local-part characters starts (the look-behind) and allows RFC 5321's 64 characters before the @:
# the unbounded `[...]+@` it replaces rescanned the rest of the run from every position of a long run without an @.
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}"
                    r"\.[A-Za-z]{2,24}")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
# A phone number needs a separator after its area code, so dates (2018-05-02) and ids (20181101) are not phones.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]?\d{3,4}(?![\w])")


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


@dataclass
class Redactor:
    """Redacts the configured kinds; `counts` accumulates what it replaced."""

    kinds: Iterable[str] = PII_KINDS
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(PII_KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {list(PII_KINDS)}")
        self.kinds = tuple(self.kinds)

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        found: Counter[str] = Counter()
        if "email" in self.kinds:
            text, n = _EMAIL.subn("[EMAIL]", text)
            found["email"] += n
        if "iban" in self.kinds:
            text = _IBAN.sub(lambda m: _count(found, "iban", "[IBAN]", m.group()) if iban_valid(m.group())
                             else m.group(), text)
        if "card" in self.kinds:
            text = _CARD.sub(lambda m: _count(found, "card", "[CARD]", m.group())
                             if luhn_valid(re.sub(r"\D", "", m.group())) else m.group(), text)
        if "phone" in self.kinds:
            text = _PHONE.sub(lambda m: _count(found, "phone", "[PHONE]", m.group())
                              if sum(c.isdigit() for c in m.group()) >= 7 else m.group(), text)
        found = +found
        self.counts.update(found)
        return text, found


def _count(counter: Counter[str], kind: str, replacement: str, _original: str) -> str:
    counter[kind] += 1
    return replacement
