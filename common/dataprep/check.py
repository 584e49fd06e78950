"""``data check``: what a site's folder holds and whether training can use it.

Reads every file (problems are collected per file and line, never raised half-way), then reports
forms, fields, labels, token lengths for the configured model, duplicates, and suspected personal
data by kind (counts only). The folder is read by :func:`common.core.records.read_records`, the
reader training uses, and ``usable`` is what training says: it refuses any malformed record or
unreadable file, so every problem there makes the folder unusable.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from common.core.config import Config
from common.core.records import Record
from common.core.tasks import prepare_prompt
from common.dataprep.dedup import find_duplicates
from common.dataprep.redact import Redactor
from common.dataprep.report import MAX_LISTED, REPORT_NAME, CheckReport, FileSummary, Lengths
from common.dataprep.rows import Loaded, load_folder

logger = logging.getLogger(__name__)
BATCH = 1024


def check_folder(
    folder: str | Path, cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None
) -> CheckReport:
    """The report of ``fedtune data check``; ``tokenizer`` defaults to the configured model's."""
    folder = Path(folder)
    loaded = load_folder(folder, cfg.data)
    read = loaded.read
    ignored = [name for name in read.ignored if name != REPORT_NAME]
    report = CheckReport(str(folder), records=len(read.records), ignored_files=ignored)
    _describe(report, loaded)
    tok = tokenizer if tokenizer is not None else _tokenizer(cfg)
    report.tokens = token_lengths(read.records, tok, cfg)
    dups = find_duplicates(loaded.docs, cfg.data.prepare.dedup)
    report.duplicates = {
        "exact": dups.exact,
        "near": dups.near,
        "eval_with_duplicate_in_train": dups.cross_split,
        "clusters_with_conflicting_labels": dups.label_conflicts,
    }
    report.personal_data = personal_data(loaded, cfg)
    _verdict(report, loaded, cfg)
    logger.info("checked %s: %d records, usable=%s", folder, report.records, report.usable)
    return report


def _tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    from common.core.models import load_base

    return load_base(cfg.model, cfg.data.labels).tokenizer


def _describe(report: CheckReport, loaded: Loaded) -> None:
    read = loaded.read
    records = Counter(r.file for r in read.rows)
    problems = Counter(i.file for i in read.issues)
    for f in read.files:
        name, form = f.name, read.file_forms.get(f.name, "")
        summary = FileSummary(name, len(f.rows), records[name], form, f.skipped, problems[name])
        report.files.append(summary)
    report.forms = dict(Counter(read.forms))
    report.fields = dict(loaded.fields.most_common())
    report.labels = dict(Counter(r.label for r in read.records if r.label is not None))
    report.issues_by_kind = dict(Counter(i.kind for i in read.issues))
    report.issues = [str(i) for i in read.issues[:MAX_LISTED]]


def token_lengths(records: list[Record], tok: PreTrainedTokenizerBase, cfg: Config) -> Lengths:
    """Untruncated example lengths, as training would build them (prompt, answer, end token)."""
    batches = (records[i : i + BATCH] for i in range(0, len(records), BATCH))
    lengths = np.array([n for b in batches for n in _batch(b, tok, cfg)], dtype=np.int64)
    if not len(lengths):
        return Lengths(cfg.model.max_length)
    p50, p90, p99 = (int(v) for v in np.percentile(lengths, [50, 90, 99]))
    return Lengths(
        cfg.model.max_length, int(lengths.min()), p50, p90, p99, int(lengths.max()),
        round(float(lengths.mean()), 1), int((lengths > cfg.model.max_length).sum()),
    )  # fmt: skip


def _batch(records: list[Record], tok: PreTrainedTokenizerBase, cfg: Config) -> list[int]:
    if cfg.model.task == "seq-cls":
        texts = ["\n".join(m["content"] for m in r.messages) for r in records]
        return [len(ids) for ids in tok(texts)["input_ids"]]
    prompts = [prepare_prompt(r, cfg) for r in records]
    if tok.chat_template:
        rendered = tok.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    else:
        rendered = ["\n".join(m["content"] for m in p) + "\n" for p in prompts]
    prompt_ids = tok(list(rendered), add_special_tokens=False)["input_ids"]
    answer_ids = tok([r.answer for r in records], add_special_tokens=False)["input_ids"]
    eos = 1 if tok.eos_token_id is not None else 0
    return [len(p) + len(a) + eos for p, a in zip(prompt_ids, answer_ids, strict=True)]


def personal_data(loaded: Loaded, cfg: Config) -> dict[str, int]:
    """Suspected personal data by kind, counted exactly as ``--redact`` would replace it."""
    redactor = Redactor(cfg.data.prepare.redact)
    found: Counter[str] = Counter()
    records = 0
    for doc in loaded.docs:
        before = sum(found.values())
        redactor.redact_texts(doc.texts, found)
        records += sum(found.values()) > before
    return {**dict(sorted(found.items())), "records_with_any": records}


def _verdict(report: CheckReport, loaded: Loaded, cfg: Config) -> None:
    """Not usable exactly when training's :func:`~common.core.records.read_folder` refuses it."""
    report.reasons += [str(p) for f in loaded.read.files if (p := f.problem())]
    if report.issues_by_kind:
        n = sum(report.issues_by_kind.values())
        report.reasons.append(f"{n} malformed or unreadable record(s); training refuses them")
    if not report.records:
        report.reasons.append("no valid records")
    if len(report.forms) > 1:
        report.warnings.append(f"mixed record forms across files: {report.forms}")
    if report.tokens.truncated:
        report.warnings.append(
            f"{report.tokens.truncated} example(s) longer than `model.max_length` "
            f"({cfg.model.max_length} tokens) will be truncated"
        )
    if report.duplicates.get("eval_with_duplicate_in_train"):
        report.warnings.append("evaluation records duplicate training records: eval is inflated")
    report.usable = not report.reasons
