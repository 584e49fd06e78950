"""Config sections of on-site data preparation (`data.prepare`, `fedtune data prepare`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from common.core.config.section import Section

RedactKind = Literal["email", "phone", "date", "id", "card", "iban", "name", "url", "ip"]
REDACT_KINDS: tuple[RedactKind, ...] = (
    "email", "phone", "date", "id", "card", "iban", "name", "url", "ip",
)  # fmt: skip
DEFAULT_ID_PATTERNS = [
    r"\b\d{3}-\d{2}-\d{4}\b",  # US social security number
    r"\b(?:MRN|medical record (?:no\.?|number))[\s:#-]*(?P<value>[A-Z0-9][A-Z0-9-]{4,})\b",
]


class CleanConfig(Section):
    """Text cleaning rules of `data prepare --clean`."""

    enabled: bool = Field(False, description="Apply the cleaning rules below.")
    html: bool = Field(True, description="Decode HTML entities and remove HTML tags.")
    control_chars: bool = Field(True, description="Remove control and zero-width characters.")
    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalization form; `none` leaves text as it is."
    )
    whitespace: bool = Field(True, description="Collapse runs of spaces, trim lines and ends.")
    min_chars: int = Field(1, ge=0, description="Drop records whose text is shorter (characters).")
    max_chars: int = Field(0, ge=0, description="Drop records whose text is longer; 0 = no limit.")


class DedupConfig(Section):
    """Duplicate removal of `data prepare --dedup`; keeps the first record of each cluster."""

    enabled: bool = Field(False, description="Remove exact and near duplicates.")
    exact: bool = Field(True, description="Remove records whose normalized text is identical.")
    near: bool = Field(True, description="Remove near duplicates found with MinHash LSH.")
    threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard similarity of word shingles for a near duplicate."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature size).")
    shingle_words: int = Field(3, ge=1, le=10, description="Words per shingle.")
    seed: int = Field(1, description="Seed of the MinHash permutations.")


class RedactConfig(Section):
    """Personal-data redaction of `data prepare --redact`: typed placeholders such as `[EMAIL]`."""

    enabled: bool = Field(False, description="Replace personal data with typed placeholders.")
    kinds: list[RedactKind] = Field(
        default_factory=lambda: list(REDACT_KINDS), description="Built-in kinds to redact."
    )
    id_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ID_PATTERNS),
        description=(
            "Regexes of national or medical record numbers, replaced by `[ID]`; a named group "
            "`value` limits the replacement to that group."
        ),
    )
    names: list[str] = Field(
        default_factory=list, description="Names replaced by `[NAME]` (whole words, any case)."
    )
    name_patterns: list[str] = Field(
        default_factory=list, description="Regexes of names, replaced by `[NAME]` (group `value`)."
    )
    extra_patterns: dict[str, str] = Field(
        default_factory=dict,
        description="Site-specific kinds: `{kind = regex}`, replaced by `[KIND]` (group `value`).",
    )

    @model_validator(mode="after")
    def _patterns_compile(self) -> RedactConfig:
        problems = [
            f"`{where}`: {problem}"
            for where, pattern in self._patterns()
            if (problem := _regex_problem(pattern))
        ]
        problems += [
            f"`extra_patterns.{k}`: kind must be lowercase letters, digits or `_`"
            for k in self.extra_patterns
            if not re.fullmatch(r"[a-z][a-z0-9_]*", k)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _patterns(self) -> list[tuple[str, str]]:
        pairs = [(f"id_patterns[{i}]", p) for i, p in enumerate(self.id_patterns)]
        pairs += [(f"name_patterns[{i}]", p) for i, p in enumerate(self.name_patterns)]
        return pairs + [(f"extra_patterns.{k}", p) for k, p in self.extra_patterns.items()]


def _regex_problem(pattern: str) -> str:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        return f"not a valid regex ({err})"
    return "" if compiled.match("") is None else "matches the empty string"


class PrepareConfig(Section):
    """Site data preparation (`fedtune data prepare`, or on the fly in the ClientApp)."""

    clean: CleanConfig = Field(default_factory=CleanConfig, description="Text cleaning.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Duplicate removal.")
    redact: RedactConfig = Field(default_factory=RedactConfig, description="Redaction.")
    max_line_bytes: int = Field(
        16 * 2**20, gt=0, description="Lines longer than this are skipped and reported."
    )

    @property
    def enabled(self) -> bool:
        """Whether any rule is on (the ClientApp then prepares records on the fly)."""
        return self.clean.enabled or self.dedup.enabled or self.redact.enabled
