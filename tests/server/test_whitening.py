"""`model.head_input = "whitened"` through the real round loop and ClientApp, in-process: the
coordinator's map, computed from public reference texts that are no site's records, reaches every
site and `publish` folds it; a coordinator that sends a crafted map cannot enlarge what a DP site
sends nor what it spends, and a message without the map is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers import AutoModelForSequenceClassification

from client.app import app as client_app
from client.site import site_model
from common.core import headinput
from common.core.adapters import get_state
from common.core.errors import ModelError, RoundError
from common.core.models import load_base
from common.protocol import keys
from common.protocol.wire import config_record, from_record, to_record
from server.publishing.model_card import render_model_card
from server.publishing.publish import PublishError, merged_round
from server.run import FederatedRun
from tests.server.inprocess import InProcessGrid
from tests.server.test_run import setup_run

WHITENED = [
    "model.task=seq-cls",
    'model.head_input="whitened"',
    'lora.method="head"',
    "simulation.partition.max_test_records=20",
    "simulation.partition.reference_records=30",
]


@pytest.fixture
def whitened_cfg():
    from common.core.config import load_config
    from tests.conftest import SCENARIOS

    return load_config(SCENARIOS / "tiny.toml", ["data.labels=['red','green','blue']", *WHITENED])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_coordinators_map_reaches_every_site_and_publish_folds_it(whitened_cfg, tmp_path):
    cfg, nodes = setup_run(whitened_cfg, tmp_path, {"rounds": 1})
    reference = _lines(Path(cfg.model.head_reference))
    assert len(reference) == 30 and all(set(r) == {"text"} for r in reference)  # no labels
    grid = InProcessGrid(client_app, nodes)
    FederatedRun(cfg, tmp_path / "run", grid).execute()

    # the map is the reference's whitening through the base model, recomputed independently
    sent = headinput.load_whitening(tmp_path / "run")
    loaded = load_base(cfg.model, cfg.data.labels)
    texts = [r["text"] for r in reference]
    feats = headinput.reference_features(loaded.model, loaded.tokenizer, texts, 96)
    torch.testing.assert_close(sent, headinput.whitening_map(feats))
    # every message to a site carried it, and the sites computed with it
    carried = [
        m.content.config_records[keys.CONFIG].get(keys.HEAD_WHITENING)
        for m in grid.sent
        if keys.CONFIG in m.content.config_records
    ]
    assert carried and all(raw == headinput.to_bytes(sent) for raw in carried)
    # and the bytes the coordinator sent count it: 3 sites x 64 x 64 float32, beside the head
    (row,) = _lines(tmp_path / "run" / "metrics.jsonl")
    head = sum(v.size * 4 for v in get_state(loaded.model, ["score.weight"]).values())
    assert row["bytes_down"] >= 3 * (64 * 64 * 4 + head)
    torch.testing.assert_close(headinput.whitening_of(site_model(cfg).model), sent)

    # publish's model: the run's merged model with the map, then folded into a plain head
    _, merged, tok = merged_round(tmp_path / "run")
    batch = tok(texts[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        hooked = merged.eval()(**batch).logits
    assert headinput.fold(merged) == 1
    merged.save_pretrained(tmp_path / "plain")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, hooked, atol=1e-4, rtol=1e-4)

    # the summary names the map (and its reference); a map swapped in afterwards is refused
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    info = summary["head_whitening"]
    assert info["reference"] == cfg.model.head_reference and info["reference_texts"] == 30
    assert info["sha256"] == hashlib.sha256(headinput.to_bytes(sent)).hexdigest()
    card = render_model_card(cfg, summary, 1, {}, {})
    assert "whitened by a map from the coordinator's public reference texts" in card
    assert info["sha256"] in card and info["reference_sha256"] in card
    assert (
        "`reference.jsonl`, 30 texts" in card and str(tmp_path) not in card
    )  # no coordinator path
    headinput.save_whitening(tmp_path / "run", sent * 2)
    with pytest.raises(PublishError, match="is not the map the run sent its sites"):
        merged_round(tmp_path / "run")


@pytest.fixture(autouse=True)
def _task_identity():
    """What the in-process grid sets for a run; put back as it was after each test."""
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def _train(cfg, nodes, node: int, whitening: bytes | None, run_id: str) -> Message:
    sm = site_model(cfg)
    extra = {keys.ROUND: 1, keys.FINGERPRINT: sm.fingerprint, keys.RUN_ID: run_id}
    if whitening is not None:
        extra[keys.HEAD_WHITENING] = whitening
    content = RecordDict({
        keys.ADAPTER: to_record(get_state(sm.model, sm.keys)),
        keys.CONFIG: config_record(cfg, extra),
    })  # fmt: skip
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as the grid does
    msg = Message(content, dst_node_id=node, message_type=keys.TRAIN)
    msg.metadata.__dict__["_message_id"] = run_id
    ctx = Context(run_id=1, node_id=node, node_config=nodes[node], state=RecordDict(),
                  run_config={})  # fmt: skip
    return client_app(msg, ctx)


def test_a_crafted_map_cannot_enlarge_a_dp_sites_update_or_its_spending(whitened_cfg, tmp_path):
    """A patched coordinator scales the map by 10^4 (every head input 10^4 times longer, and
    so every per-record gradient): the site's per-record clip and its own noise hold, so its
    update is no larger and its epsilon the same. The same site without DP and without
    gradient clipping shows the scaling would have reached the update. Scaled by 10^38 (past
    float32), the DP site still replies, with noise alone."""
    dp = [
        "privacy.record.enabled=true", "privacy.record.target_epsilon=8",
        'train.optimizer="sgd"', "train.local_steps=2", "train.lr=0.5",
    ]  # fmt: skip
    from common.core.config import load_config
    from tests.conftest import SCENARIOS

    def norms(cfg, nodes, tag: str) -> dict[str, tuple[float, object]]:
        out = {}
        for name, scale in (("honest", 1.0), ("crafted", 1e4)):
            reply = _train(cfg, nodes, 100, headinput.to_bytes(a * scale), f"{tag}-{name}")
            assert not reply.has_error(), reply.error
            update = from_record(reply.content.array_records[keys.UPDATE])
            metrics = dict(reply.content.metric_records[keys.METRICS])
            norm = float(np.sqrt(sum(float((v**2).sum()) for v in update.values())))
            out[name] = (norm, metrics.get(keys.RECORD_EPSILON))
        return out

    base = load_config(SCENARIOS / "tiny.toml", ["data.labels=['red','green','blue']", *WHITENED])
    cfg, nodes = setup_run(base, tmp_path / "plain", {"rounds": 1})
    loaded = load_base(cfg.model, cfg.data.labels)
    texts = [r["text"] for r in _lines(Path(cfg.model.head_reference))]
    feats = headinput.reference_features(loaded.model, loaded.tokenizer, texts, 96)
    a = headinput.whitening_map(feats)
    unclipped = {"optimizer": "sgd", "local_steps": 2, "lr": 0.5, "max_grad_norm": 1e12}
    plain = norms(
        cfg.model_copy(update={"train": cfg.train.model_copy(update=unclipped)}), nodes, "plain"
    )
    assert plain["crafted"][0] > 100 * plain["honest"][0]  # unclipped, the scaling gets through

    private = load_config(
        SCENARIOS / "tiny.toml", ["data.labels=['red','green','blue']", *WHITENED, *dp]
    )
    cfg, nodes = setup_run(private, tmp_path / "dp", {"rounds": 1})
    got = norms(cfg, nodes, "dp")
    assert got["crafted"][0] < 2 * got["honest"][0]  # the clip bound holds whatever the map
    assert got["honest"][1] is not None and got["crafted"][1] == got["honest"][1]

    # A map that overflows float32 (every head input Inf or NaN): the records' gradients are
    # not finite, so they add nothing, and the site still sends a finite update of noise
    # alone, spending what it planned: it does not fail on some records and not on others.
    reply = _train(cfg, nodes, 100, headinput.to_bytes(a * 1e38), "dp-overflow")
    assert not reply.has_error(), reply.error
    update = from_record(reply.content.array_records[keys.UPDATE])
    assert all(np.isfinite(v).all() for v in update.values())
    norm = float(np.sqrt(sum(float((v**2).sum()) for v in update.values())))
    assert 0 < norm < 2 * got["honest"][0]
    epsilon = dict(reply.content.metric_records[keys.METRICS]).get(keys.RECORD_EPSILON)
    assert epsilon == got["honest"][1]


def test_a_message_without_the_map_is_refused(whitened_cfg, tmp_path):
    cfg, nodes = setup_run(whitened_cfg, tmp_path, {"rounds": 1})
    with pytest.raises(ModelError, match="sent no whitening map"):  # the engine's error reply
        _train(cfg, nodes, 100, None, "no-map")


def test_a_resumed_run_sends_the_map_its_sites_already_had(whitened_cfg, tmp_path):
    """Even if the reference file changed meanwhile: the sites' head keeps one map per run."""
    from tests.server.inprocess import ServerKilled, kill_in_round

    cfg, nodes = setup_run(whitened_cfg, tmp_path, {"rounds": 2})
    grid = InProcessGrid(client_app, nodes)
    grid.fault = kill_in_round(2)
    with pytest.raises(ServerKilled):
        FederatedRun(cfg, tmp_path / "run", grid).execute()
    first = headinput.to_bytes(headinput.load_whitening(tmp_path / "run"))
    info = tmp_path / "run" / "head-whitening.json"
    kept = info.read_text()
    info.unlink()
    with pytest.raises(RoundError, match="head-whitening.json` is missing"):
        FederatedRun(cfg, tmp_path / "run", InProcessGrid(client_app, nodes), resume=True).execute()
    info.write_text(kept)
    ref = Path(cfg.model.head_reference)
    other = [{"text": r["text"] + " again"} for r in _lines(ref)]
    ref.write_text("".join(json.dumps(r) + "\n" for r in other))  # recomputed: another map
    resumed = InProcessGrid(client_app, nodes)
    FederatedRun(cfg, tmp_path / "run", resumed, resume=True).execute()
    carried = {
        m.content.config_records[keys.CONFIG].get(keys.HEAD_WHITENING)
        for m in resumed.sent
        if keys.CONFIG in m.content.config_records
    }
    assert carried == {first}
