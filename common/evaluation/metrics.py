"""Task metrics from library implementations (sacrebleu, rouge-score), and group gaps.

Classification: accuracy, macro-F1, per-class precision / recall / F1 / support and the
confusion matrix (rows: the true label, columns: the predicted one). Generation: ROUGE-1/2/L
(F-measure, rouge-score with stemming), corpus BLEU and chrF (sacrebleu, their standard
settings) and exact match. Scores are fractions in [0, 1], except BLEU and chrF, which are on
sacrebleu's 0-100 scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def classification(
    golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} references but {len(preds)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(golds, preds, strict=True):
        confusion[index[g]][index[p]] += 1
    per_class: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [c for c in per_class.values() if c["support"]]  # classes absent from the data
    n = len(golds)
    return {
        "examples": n,
        "accuracy": sum(confusion[i][i] for i in range(len(labels))) / n if n else 0.0,
        "macro_f1": sum(c["f1"] for c in present) / len(present) if present else 0.0,
        "per_class": per_class,
        "confusion": {"labels": list(labels), "matrix": confusion},
    }


def generation(refs: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(refs) != len(preds):
        raise ValueError(f"{len(refs)} references but {len(preds)} predictions")
    if not refs:
        return {"examples": 0}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for ref, pred in zip(refs, preds, strict=True):
        scores = scorer.score(ref, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = len(refs)
    return {
        "examples": n,
        **{key: value / n for key, value in totals.items()},
        "bleu": float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score),
        "chrf": float(sacrebleu.corpus_chrf(list(preds), [list(refs)]).score),
        "exact_match": sum(_norm(r) == _norm(p) for r, p in zip(refs, preds, strict=True)) / n,
    }


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def largest_gap(by_group: Mapping[str, Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """The spread of ``metric`` over the groups: best and worst group and their difference."""
    values = {g: float(m[metric]) for g, m in by_group.items() if metric in m}
    if len(values) < 2:
        return {"metric": metric, "gap": 0.0, "best": None, "worst": None}
    best = max(values, key=lambda g: values[g])
    worst = min(values, key=lambda g: values[g])
    return {"metric": metric, "gap": values[best] - values[worst], "best": best, "worst": worst}
