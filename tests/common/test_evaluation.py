"""`fedtune evaluate`'s parts on small hand-checked examples: each metric, the group gap, each
perturbation, and the report of a tiny model (sections, targets, groups that add up)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from common.core.errors import DataError
from common.evaluation import metrics
from common.evaluation.perturb import PERTURBATIONS, perturb_texts


def test_classification_metrics_by_hand():
    golds, preds = ["a", "a", "b", "c"], ["a", "b", "b", "a"]
    m = metrics.classification(golds, preds, ["a", "b", "c"])
    assert m["confusion"]["matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert m["accuracy"] == 0.5
    assert m["per_class"]["a"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    # a class absent from the data does not pull macro-F1 down
    assert metrics.classification(["a"], ["a"], ["a", "b"])["macro_f1"] == 1.0


def test_generation_metrics_by_hand():
    ref, pred = "the cat sat on the mat", "the cat sat on a mat"
    m = metrics.generation([ref], [pred])
    assert m["rouge1"] == pytest.approx(5 / 6)  # 5 of 6 words on either side
    assert m["rouge2"] == pytest.approx(3 / 5)  # the cat, cat sat, sat on
    assert m["rougeL"] == pytest.approx(5 / 6)  # LCS: the cat sat on mat
    assert m["exact_match"] == 0.0 and 0.0 < m["bleu"] < 100.0 and 0.0 < m["chrf"] < 100.0
    short = metrics.generation([ref], ["the cat sat"])
    assert short["rouge1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P 3/3, R 3/6
    assert short["bleu"] == 0.0  # no 4-gram at all: BLEU is 0 (sacrebleu's standard settings)
    same = metrics.generation([ref, "a b c d e"], [ref, " A  b c d e "])
    assert same["exact_match"] == 1.0  # case and spacing do not count
    exact = metrics.generation([ref], [ref])
    assert exact["bleu"] == pytest.approx(100.0) and exact["chrf"] == pytest.approx(100.0)
    assert exact["rouge1"] == exact["rouge2"] == exact["rougeL"] == 1.0


def test_largest_gap_names_the_best_and_worst_group():
    gap = metrics.largest_gap(
        {"x": {"accuracy": 0.9}, "y": {"accuracy": 0.8}, "z": {"accuracy": 0.85}}, "accuracy"
    )
    assert gap == {"metric": "accuracy", "gap": pytest.approx(0.1), "best": "x", "worst": "y"}
    assert metrics.largest_gap({"x": {"accuracy": 0.9}}, "accuracy")["gap"] == 0.0


TEXT = " ".join(f"word{i} alpha bravo charlie delta echo" for i in range(20))


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_each_perturbation_is_seeded_changes_the_text_and_keeps_what_it_should(name):
    once = perturb_texts([TEXT, TEXT], name, seed=1, rate=0.3)
    assert once == perturb_texts([TEXT, TEXT], name, seed=1, rate=0.3)  # same seed, same text
    assert once != perturb_texts([TEXT, TEXT], name, seed=2, rate=0.3)
    assert once[0] != TEXT and once[0] != once[1]  # one generator runs through the texts
    out, words = once[0], TEXT.split()
    if name == "typos":  # neighbouring letters swapped: each word keeps its letters
        assert [Counter(w) for w in out.split()] == [Counter(w) for w in words]
    elif name == "case":
        assert out.lower() == TEXT.lower()
    elif name == "whitespace":
        assert out.split() == words and out != TEXT
    else:  # word_drop: an ordered subset, never empty
        kept = out.split()
        assert 0 < len(kept) < len(words)
        it = iter(words)
        assert all(w in it for w in kept)
    assert PERTURBATIONS[name]("", random.Random(0), 1.0) == ""


def _labelled(tmp_path, rows):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_record_without_the_group_field_is_named_with_its_line(tiny_cfg, tmp_path):
    from common.evaluation.run import read_with_groups

    rows = [{"text": "red red", "label": "red", "dept": "a"}, {"text": "blue", "label": "blue"}]
    with pytest.raises(DataError, match=r"records.jsonl:2.*`--group-by` field `dept`"):
        read_with_groups(_labelled(tmp_path, rows), tiny_cfg, "dept")


def test_the_report_of_a_tiny_model_has_every_section_and_its_groups_add_up(tiny_cfg, tmp_path):
    from common.core.adapters import attach_lora
    from common.core.models import load_base
    from common.evaluation import report as report_files
    from common.evaluation.run import evaluate_model, read_with_groups

    colours = ["red", "green", "blue"]
    rows = [
        {"text": f"the colour is {c}", "label": c, "dept": "ab"[i % 2]}
        for i, c in enumerate(colours * 6)
    ]
    records, groups = read_with_groups(_labelled(tmp_path, rows), tiny_cfg, "dept")
    loaded = load_base(tiny_cfg.model, tiny_cfg.data.labels)
    model = attach_lora(loaded.model, tiny_cfg.lora, tiny_cfg.model)
    rep = evaluate_model(model, loaded.tokenizer, tiny_cfg, records, groups, latency_requests=3)
    m = rep["metrics"]
    assert rep["task"] == "classification" and m["examples"] == 18
    assert sum(map(sum, m["confusion"]["matrix"])) == 18
    by = rep["groups"]["by_group"]
    assert set(by) == {"a", "b"} and by["a"]["examples"] + by["b"]["examples"] == 18
    hits = by["a"]["accuracy"] * by["a"]["examples"] + by["b"]["accuracy"] * by["b"]["examples"]
    assert hits == pytest.approx(m["accuracy"] * 18)
    assert rep["groups"]["gap"] == pytest.approx(abs(by["a"]["accuracy"] - by["b"]["accuracy"]))
    assert rep["groups"]["met"] == (rep["groups"]["gap"] <= 0.05)
    assert set(rep["robustness"]["perturbations"]) == set(PERTURBATIONS)
    assert (
        rep["latency"]["requests"] == 3 and rep["latency"]["p95_ms"] >= rep["latency"]["p50_ms"] > 0
    )
    assert set(rep["targets"]) == {"group_gap", "robustness", "latency"}
    js, md = report_files.write(rep, tmp_path / "report")
    assert json.loads(js.read_text())["records"] == 18
    text = md.read_text()
    assert "## Groups" in text and "## Robustness" in text and "## Latency" in text
    assert (tmp_path / "report" / "confusion.png").stat().st_size > 1000
