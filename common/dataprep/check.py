"""``data check``: what a site's folder holds and whether training can use it.

Reads every file (problems are collected per file and line, never raised half-way), then reports
forms, fields, labels, token lengths for the configured model, duplicates, and suspected personal
data by kind (counts only). ``usable`` is what training would say: it reads JSONL and CSV and
refuses any malformed record, so every problem there makes the folder unusable.
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
from common.dataprep.readers import TRAINING_SUFFIXES, FileRows, list_files, read_file
from common.dataprep.redact import Redactor
from common.dataprep.report import MAX_LISTED, CheckReport, FileSummary, Lengths
from common.dataprep.rows import Loaded, load_rows

logger = logging.getLogger(__name__)
BATCH = 1024


def read_folder_rows(folder: Path, cfg: Config) -> tuple[list[FileRows], list[str], Loaded]:
    """Every file of ``folder`` read and checked; raises DataError only for the folder itself."""
    paths, ignored = list_files(folder)
    files = [read_file(p, cfg.data.prepare.max_line_bytes) for p in paths]
    return files, ignored, load_rows(files, cfg.data.form, cfg.data.labels)


def check_folder(
    folder: str | Path, cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None
) -> CheckReport:
    """The report of ``fedtune data check``; ``tokenizer`` defaults to the configured model's."""
    folder = Path(folder)
    files, ignored, loaded = read_folder_rows(folder, cfg)
    report = CheckReport(str(folder), records=len(loaded.records), ignored_files=ignored)
    _describe(report, files, loaded)
    tok = tokenizer if tokenizer is not None else _tokenizer(cfg)
    report.tokens = token_lengths(loaded.records, tok, cfg)
    dups = find_duplicates(loaded.docs, cfg.data.prepare.dedup)
    report.duplicates = {
        "exact": dups.exact,
        "near": dups.near,
        "eval_with_duplicate_in_train": dups.cross_split,
        "clusters_with_conflicting_labels": dups.label_conflicts,
    }
    report.personal_data = personal_data(loaded, cfg)
    _verdict(report, cfg)
    logger.info("checked %s: %d records, usable=%s", folder, report.records, report.usable)
    return report


def _tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    from common.core.models import load_base

    return load_base(cfg.model, cfg.data.labels).tokenizer


def _describe(report: CheckReport, files: list[FileRows], loaded: Loaded) -> None:
    records = Counter(r.file for r in loaded.rows)
    problems = Counter(i.where.rsplit(":", 1)[0] for i in loaded.issues)
    for f in files:
        name = f.path.name
        form = loaded.file_forms.get(name, "")
        summary = FileSummary(name, len(f.rows), records[name], form, f.skipped, problems[name])
        report.files.append(summary)
    report.forms = dict(Counter(loaded.forms))
    report.fields = dict(loaded.fields.most_common())
    report.labels = dict(Counter(r.label for r in loaded.records if r.label is not None))
    report.issues_by_kind = dict(Counter(i.kind for i in loaded.issues))
    report.issues = [str(i) for i in loaded.issues[:MAX_LISTED]]


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


def _verdict(report: CheckReport, cfg: Config) -> None:
    for f in report.files:
        if f.skipped:
            report.reasons.append(f"`{f.name}` {f.skipped}")
        elif not f.records and not f.issues:
            report.reasons.append(f"`{f.name}` is empty (no records)")
        elif not f.name.endswith(TRAINING_SUFFIXES) and not cfg.data.prepare.enabled:
            report.warnings.append(
                f"`{f.name}`: training reads {' and '.join(TRAINING_SUFFIXES)} files only; "
                "`fedtune data prepare` converts Parquet to JSONL"
            )
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
