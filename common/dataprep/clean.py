"""Cleaning rules: HTML, control characters, Unicode normalization, whitespace, lengths.

Each rule is a small class with a ``name`` and an ``apply`` that is idempotent (applying it to its
own output changes nothing), so preparing a prepared folder changes nothing. Counts are records
changed per rule; texts are never logged.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from typing import Protocol

from common.core.config import CleanConfig

# Only entities closed by `;`: html.unescape alone also decodes `&para` in `&parameter=1`.
_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>", re.S)
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|tr|td|h[1-6])\b", re.I)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


class Rule(Protocol):
    name: str

    def apply(self, text: str) -> str: ...


class HtmlRule:
    """Decode entities (repeatedly: `&amp;lt;` was escaped twice) and drop tags."""

    name = "html"

    def apply(self, text: str) -> str:
        while "&" in text or "<" in text:
            new = _TAG.sub(self._tag, _ENTITY.sub(lambda m: html.unescape(m.group()), text))
            if new == text:
                break
            text = new
        return text

    @staticmethod
    def _tag(match: re.Match[str]) -> str:
        return " " if _BLOCK_TAG.match(match.group()) else ""


class ControlRule:
    """Control and invisible characters out; line breaks become `\\n`."""

    name = "control_chars"

    def apply(self, text: str) -> str:
        return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


class UnicodeRule:
    def __init__(self, form: str) -> None:
        self.name = "unicode"
        self.form = form

    def apply(self, text: str) -> str:
        if text.isascii() or unicodedata.is_normalized(self.form, text):  # type: ignore[arg-type]
            return text
        return unicodedata.normalize(self.form, text)  # type: ignore[arg-type]


class WhitespaceRule:
    """One space between words, no spaces at line edges, at most one blank line, trimmed."""

    name = "whitespace"

    def apply(self, text: str) -> str:
        text = _LINE_EDGES.sub("\n", _SPACES.sub(" ", text))
        return _BLANK_LINES.sub("\n\n", text).strip()


def rules(cfg: CleanConfig) -> list[Rule]:
    """The enabled rules, in the order they run (whitespace last: the others leave gaps)."""
    chosen: list[Rule] = []
    if cfg.control_chars:
        chosen.append(ControlRule())
    if cfg.html:
        chosen.append(HtmlRule())
    if cfg.unicode_form != "none":
        chosen.append(UnicodeRule(cfg.unicode_form))
    if cfg.whitespace:
        chosen.append(WhitespaceRule())
    return chosen


def clean_texts(texts: list[str], chosen: list[Rule], counts: Counter[str]) -> list[str]:
    """Apply every rule to every text of one record; count it once per rule that changed it."""
    for rule in chosen:
        new = [rule.apply(t) for t in texts]
        if new != texts:
            counts[f"clean.{rule.name}"] += 1
            texts = new
    return texts


def length_problem(content: str, cfg: CleanConfig) -> str:
    """Why a record's length is out of the configured bounds ('' when it is within)."""
    if len(content) < cfg.min_chars:
        return f"shorter than {cfg.min_chars} characters"
    if cfg.max_chars and len(content) > cfg.max_chars:
        return f"longer than {cfg.max_chars} characters"
    return ""
