"""Personal data replaced by typed placeholders: ``[EMAIL]``, ``[PHONE]``, ``[DATE]``, ``[ID]``,
``[CARD]``, ``[IBAN]``, ``[NAME]``, ``[URL]``, ``[IP]`` and site-specific ``[KIND]`` s.

Detectors run in a fixed order (more specific first: a card number must not become a phone
number). Card numbers must pass the Luhn check and IBANs the ISO 13616 mod-97 check, so that
ordinary long numbers stay. A pattern with a named group ``value`` replaces only that group
(``MRN: 1234567`` becomes ``MRN: [ID]``). Counting uses the same code as replacing, so
``data check`` reports exactly what ``data prepare --redact`` would replace; values never leave.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from common.core.config import RedactConfig

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
PATTERNS: dict[str, str] = {
    "email": r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
    "url": r"\b(?:https?://|ftp://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]]",
    "ipv4": r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
    r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\d|\.\d)",
    "ipv6": r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])",
    "iban": r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
    "card": r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])",
    "date_numeric": r"(?<![\d.])(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4})"
    r"(?![\d])",
    "date_text": rf"\b(?:{_DAY}\s+{_MONTH}\.?,?\s+\d{{4}}|{_MONTH}\.?\s+{_DAY},?\s+\d{{4}})\b",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]?\d{2,5}){0,4}"
    r"(?![\w])",
}
_DIGIT = re.compile(r"\d")


@dataclass(frozen=True)
class Detector:
    """One kind of personal data: a pattern, an optional validator, a cheap pre-check."""

    kind: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] | None = None
    needs: str = ""  # a character the text must contain; "digit" for any digit

    def sub(self, text: str, counts: Counter[str]) -> str:
        placeholder = f"[{self.kind.upper()}]"

        def replace(m: re.Match[str]) -> str:
            group = "value" if m.re.groupindex.get("value") and m.group("value") else 0
            if self.valid is not None and not self.valid(m.group(group)):
                return m.group()
            counts[self.kind] += 1
            start, end = m.start(group) - m.start(), m.end(group) - m.start()
            return m.group()[:start] + placeholder + m.group()[end:]

        return self.pattern.sub(replace, text)


def luhn_ok(number: str) -> bool:
    """Luhn checksum of the digits in ``number`` (ISO/IEC 7812 card numbers)."""
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        total += d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, read as base 36, mod 97 == 1."""
    iban = text.replace(" ", "")
    if not 15 <= len(iban) <= 34:
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def ipv6_ok(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def date_ok(text: str) -> bool:
    """Numeric dates only: a plausible day and month (either order), or year first."""
    parts = [int(p) for p in re.split(r"[-/.]", text)]
    if len(str(parts[0])) == 4 and text[:4].isdigit():
        return 1 <= parts[1] <= 12 and 1 <= parts[2] <= 31
    a, b = parts[0], parts[1]
    return 1 <= a <= 31 and 1 <= b <= 31 and min(a, b) <= 12


def phone_ok(text: str) -> bool:
    """7 to 15 digits (E.164); a bare run of digits needs 9 to 13 (else it is just a number)."""
    digits = sum(c.isdigit() for c in text)
    if text.isdigit():
        return 9 <= digits <= 13
    return 7 <= digits <= 15


def _builtin(
    kind: str, key: str, needs: str, valid: Callable[[str], bool] | None = None
) -> Detector:
    return Detector(kind, re.compile(PATTERNS[key]), valid, needs)


def _builtins() -> list[Detector]:
    """Built-in detectors, most specific first."""
    return [
        _builtin("email", "email", "@"),
        _builtin("url", "url", ""),
        _builtin("ip", "ipv4", "digit"),
        _builtin("ip", "ipv6", ":", ipv6_ok),
        _builtin("iban", "iban", "digit", iban_ok),
        _builtin("card", "card", "digit", luhn_ok),
        _builtin("date", "date_numeric", "digit", date_ok),
        Detector("date", re.compile(PATTERNS["date_text"], re.I), None, "digit"),
        _builtin("phone", "phone", "digit", phone_ok),
    ]


def _names(cfg: RedactConfig) -> list[Detector]:
    found = [Detector("name", re.compile(p)) for p in cfg.name_patterns]
    if cfg.names:
        words = sorted({n.strip() for n in cfg.names if n.strip()}, key=len, reverse=True)
        alternation = "|".join(re.escape(w) for w in words)
        found.insert(0, Detector("name", re.compile(rf"\b(?:{alternation})\b", re.I)))
    return found


class Redactor:
    """The configured detectors; ``redact`` replaces and counts, by kind."""

    def __init__(self, cfg: RedactConfig) -> None:
        kinds = set(cfg.kinds)
        chosen = [d for d in _builtins() if d.kind in kinds]
        ids = [Detector("id", re.compile(p)) for p in cfg.id_patterns] if "id" in kinds else []
        names = _names(cfg) if "name" in kinds else []
        extra = [Detector(k, re.compile(p)) for k, p in cfg.extra_patterns.items()]
        # Configured patterns are the site's own knowledge: they run before the generic ones.
        self.detectors = ids + names + extra + chosen

    def redact(self, text: str, counts: Counter[str]) -> str:
        has_digit = _DIGIT.search(text) is not None
        for d in self.detectors:
            if _applies(d.needs, text, has_digit):
                text = d.sub(text, counts)
        return text

    def redact_texts(self, texts: list[str], counts: Counter[str]) -> list[str]:
        return [self.redact(t, counts) for t in texts]


def _applies(needs: str, text: str, has_digit: bool) -> bool:
    """A cheap pre-check: most texts have no `@`, and many no digit at all."""
    if needs == "digit":
        return has_digit
    return not needs or needs in text
