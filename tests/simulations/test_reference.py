"""`simulation.partition.reference_records`: the coordinator's public reference texts in a
simulation are held-out records after the test records, never a site's, with no labels."""

from __future__ import annotations

import json

import pytest

from common.core.config import load_config
from common.core.errors import ConfigError
from simulations.run import prepare
from tests.conftest import SCENARIOS

WHITENED = [
    "data.labels=['red','green','blue']",
    "model.task=seq-cls",
    'model.head_input="whitened"',
    "simulation.partition.max_test_records=20",
]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_reference_is_held_out_after_the_test_records_and_has_no_labels(tmp_path):
    from simulations.corpora import synthetic

    cfg = load_config(
        SCENARIOS / "tiny.toml", [*WHITENED, "simulation.partition.reference_records=25"]
    )
    cfg = prepare(cfg, tmp_path)
    path = tmp_path / "reference" / "reference.jsonl"
    assert cfg.model.head_reference == str(path.resolve())
    reference = _rows(path)
    held_out = synthetic().test  # the tiny scenario's corpus: its test split, in order
    assert reference == [{"text": r["text"]} for r in held_out[20:45]]
    assert _rows(tmp_path / "test" / "records.jsonl") == held_out[:20]
    # the run's own config (naming this folder's reference) simulates again, into its own folder
    again = prepare(cfg, tmp_path / "again")
    assert again.model.head_reference == str(tmp_path / "again" / "reference" / "reference.jsonl")
    assert _rows(tmp_path / "again" / "reference" / "reference.jsonl") == reference


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["simulation.partition.max_test_records=0"], "set `max_test_records` below"),
        (
            ["simulation.partition.reference_records=50"],
            "only 40 held-out records are left after the first 20",
        ),
        (['model.head_input="without-label-mean"'], 'is for `model.head_input` = "whitened"'),
    ],
)
def test_a_reference_that_cannot_be_taken_is_a_clear_error(tmp_path, overrides, match):
    cfg = load_config(
        SCENARIOS / "tiny.toml", [*WHITENED, "simulation.partition.reference_records=10",
                                  *overrides],
    )  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        prepare(cfg, tmp_path)
