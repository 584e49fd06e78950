"""Cleaning rules, redaction kinds and duplicate detection on crafted inputs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from common.core.config import CleanConfig, Config, DedupConfig, RedactConfig
from common.dataprep.clean import (
    ControlRule,
    HtmlRule,
    UnicodeRule,
    WhitespaceRule,
    clean_texts,
    length_problem,
    rules,
)
from common.dataprep.dedup import MinHasher, find_duplicates, jaccard, lsh_params, normalize
from common.dataprep.redact import Redactor, iban_ok, luhn_ok
from common.dataprep.rows import Doc


@pytest.mark.parametrize(
    ("rule", "raw", "clean"),
    [
        (HtmlRule(), "a &amp;lt;b&amp;gt; <i>x</i>&nbsp;y", "a  x\u00a0y"),
        (HtmlRule(), "dose&gt;5<br>next &parameter=1 AT&T", "dose>5 next &parameter=1 AT&T"),
        (ControlRule(), "a\x00b\u200bc\r\nd\re\x7f", "abc\nd\ne"),
        (UnicodeRule("NFC"), "cafe\u0301", "caf\u00e9"),
        (UnicodeRule("NFKC"), "\ufb01le m\u00b2", "file m2"),
        (WhitespaceRule(), "  a \t b \n\n\n\n c  \u00a0", "a b\n\nc"),
    ],
)
def test_each_cleaning_rule_and_its_idempotence(rule: object, raw: str, clean: str) -> None:
    assert rule.apply(raw) == clean  # type: ignore[attr-defined]
    assert rule.apply(clean) == clean  # type: ignore[attr-defined]


def test_clean_counts_records_per_rule_and_length_bounds() -> None:
    counts: Counter[str] = Counter()
    out = clean_texts(["<b>Hi</b>  there", "ok"], rules(CleanConfig()), counts)
    assert out == ["Hi there", "ok"]
    assert counts == {"clean.html": 1, "clean.whitespace": 1}
    cfg = CleanConfig(min_chars=3, max_chars=5)
    assert length_problem("ab", cfg).startswith("shorter")
    assert length_problem("abcdef", cfg).startswith("longer")
    assert length_problem("abcd", cfg) == ""


def _redact(text: str, **kw: object) -> tuple[str, Counter[str]]:
    counts: Counter[str] = Counter()
    return Redactor(RedactConfig(**kw)).redact(text, counts), counts  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("write to jane.doe@clinic.example.org now", "write to [EMAIL] now", "email"),
        ("call +31 6 1234 5678 today", "call [PHONE] today", "phone"),
        ("call (555) 123-4567", "call [PHONE]", "phone"),
        ("seen on 03/04/1985 and 2021-12-31", "seen on [DATE] and [DATE]", "date"),
        ("born 5th March 2020", "born [DATE]", "date"),
        ("MRN: A1234567 admitted", "MRN: [ID] admitted", "id"),
        ("ssn 123-45-6789", "ssn [ID]", "id"),
        ("card 4111 1111 1111 1111 paid", "card [CARD] paid", "card"),
        ("iban DE89 3704 0044 0532 0130 00.", "iban [IBAN].", "iban"),
        ("see https://example.org/x?a=1.", "see [URL].", "url"),
        ("from 192.168.10.1 and fe80::1", "from [IP] and [IP]", "ip"),
    ],
)
def test_every_redaction_kind(text: str, expected: str, kind: str) -> None:
    out, counts = _redact(text)
    assert out == expected
    assert counts[kind] == expected.count(f"[{kind.upper()}]")
    assert _redact(out)[0] == out  # placeholders are never redacted again


def test_card_and_iban_checksums_decide() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    out, counts = _redact("a 4111 1111 1111 1112 b DE89370400440532013001 c 10:30:00 d 12.5 mg")
    assert out == "a 4111 1111 1111 1112 b DE89370400440532013001 c 10:30:00 d 12.5 mg"
    assert not counts


def test_names_and_site_patterns() -> None:
    out, counts = _redact(
        "Dr. Smith saw JANE DOE in Ward 7",
        names=["Jane Doe", "Smith"],
        extra_patterns={"ward": r"\bWard \d+\b"},
    )
    assert out == "Dr. [NAME] saw [NAME] in [WARD]"
    assert counts == {"name": 2, "ward": 1}
    out, _ = _redact(
        "Patient: Alice Brown.", name_patterns=[r"Patient: (?P<value>[A-Z]\w+ [A-Z]\w+)"]
    )
    assert out == "Patient: [NAME]."


def test_bad_patterns_are_config_errors_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"id_patterns\[0\]"):
        Config.model_validate({"data": {"prepare": {"redact": {"id_patterns": ["("]}}}})
    with pytest.raises(ValidationError, match="extra_patterns.Bad"):
        Config.model_validate({"data": {"prepare": {"redact": {"extra_patterns": {"Bad": "x"}}}}})


def _docs(*texts: str) -> list[Doc]:
    return [Doc(f"f.jsonl:{i + 1}", [t], None) for i, t in enumerate(texts)]


WORDS = (
    "the patient reported mild headache after the second dose and recovered fully within two days"
)


def _shingle_jaccard(a: str, b: str, k: int = 3) -> float:
    hasher = MinHasher(DedupConfig(shingle_words=k))
    packed = hasher.shingles([normalize(a), normalize(b)])
    owner = packed >> np.uint64(32)
    low = packed & np.uint64(0xFFFFFFFF)
    return jaccard(low[owner == 0], low[owner == 1])


def test_exact_duplicates_are_normalized_and_first_is_kept() -> None:
    dups = find_duplicates(_docs("Hello  World", "other text", "hello world"), DedupConfig())
    assert dups.of == {2: 0} and dups.exact == 1 and dups.kind == {2: "exact"}


def test_no_records_means_no_duplicates() -> None:
    # `data check` on a folder of empty files gets here with no documents at all.
    dups = find_duplicates([], DedupConfig())
    assert dups.of == {} and dups.exact == dups.near == 0


def test_near_duplicates_above_and_below_threshold() -> None:
    one_word = WORDS.replace("mild", "severe")
    many = WORDS.replace("mild", "a").replace("second", "b").replace("two", "c")
    assert _shingle_jaccard(WORDS, one_word) > 0.6 > _shingle_jaccard(WORDS, many)
    cfg = DedupConfig(threshold=0.6)
    dups = find_duplicates(_docs(WORDS, "unrelated words entirely here", one_word, many), cfg)
    assert dups.of == {2: 0} and dups.near == 1
    strict = find_duplicates(_docs(WORDS, one_word), DedupConfig(threshold=0.95))
    assert not strict.of


def test_near_dedup_is_idempotent_and_reports_cross_split_and_conflicts() -> None:
    docs = _docs(WORDS, WORDS.replace("mild", "severe"), "x y z")
    docs[1].eval, docs[1].label, docs[0].label = True, "b", "a"
    dups = find_duplicates(docs, DedupConfig(threshold=0.6))
    assert dups.cross_split == 1 and dups.label_conflicts == 1
    kept = [d for i, d in enumerate(docs) if i not in dups.of]
    assert not find_duplicates(kept, DedupConfig(threshold=0.6)).of


def test_lsh_params_and_scaling_stays_sub_quadratic() -> None:
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128 and bands > 1
    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(3000)])
    texts = [" ".join(rng.choice(vocab, 30)) for _ in range(4000)]
    docs = _docs(*texts, *(t + " extra" for t in texts[:100]))
    dups = find_duplicates(docs, DedupConfig())
    assert dups.near == 100 and all(v < 4000 for v in dups.of.values())
