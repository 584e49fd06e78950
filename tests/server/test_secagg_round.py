"""Secure aggregation over the Message API with the real ClientApp in-process.

One plaintext round records every site's update (the reference); secure rounds, with and without
dropouts, must produce the adapter a numpy weighted average of the contributors' updates gives,
within the quantization bound the round reports (plus float32 rounding of the adapter itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message
from safetensors.numpy import load_file

from client.app import app as client_app
from common.core.config import Config, load_config
from common.core.errors import RoundError
from common.identity.certs import EphemeralFederation, ephemeral_federation
from common.protocol import keys
from common.protocol.wire import from_record
from server.run import FederatedRun
from server.secagg_round import threshold_for
from simulations.run import prepare
from tests.conftest import SCENARIOS
from tests.server.inprocess import InProcessGrid

NODES = (100, 101, 102)


class Recorder:
    """The real ClientApp, keeping what crossed the wire (plaintext runs only need this)."""

    def __init__(self) -> None:
        self.sent: dict[int, dict[str, np.ndarray]] = {}
        self.updates: dict[int, dict[str, np.ndarray]] = {}
        self.records: dict[int, int] = {}
        self.replies: list[Message] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        self.replies.append(reply)
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == "train" and "update" in reply.content:
            self.sent[node] = dict(from_record(msg.content.array_records["adapter"]))
            self.updates[node] = dict(from_record(reply.content.array_records["update"]))
            self.records[node] = int(reply.content.metric_records["metrics"]["num-examples"])
        return reply


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict[int, dict], Path]:
    root = tmp_path_factory.mktemp("secagg")
    cfg = prepare(load_config(SCENARIOS / "tiny.toml", ["federation.rounds=1"]), root)
    # No server-side evaluation: these tests compare adapters, and it halves their time.
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"test_dir": ""})})
    nodes = {
        n: {"data-dir": str(root / "sites" / f"site-{i}"), "site-name": f"site-{i}"}
        for i, n in enumerate(NODES)
    }
    return cfg, nodes, root


@pytest.fixture(scope="module")
def plain(base: tuple[Config, dict[int, dict], Path]) -> tuple[Recorder, dict[str, Any]]:
    cfg, nodes, root = base
    recorder = Recorder()
    FederatedRun(cfg, root / "plain", InProcessGrid(recorder, nodes)).execute()
    return recorder, _row(root / "plain")


def secure(base: tuple[Config, dict[int, dict], Path], name: str, fault: Any = None, **fed: Any):
    cfg, nodes, root = base
    cfg = cfg.model_copy(
        update={
            "secagg": cfg.secagg.model_copy(update={"enabled": True}),
            "federation": cfg.federation.model_copy(update={"round_timeout_s": 1.0, **fed}),
        }
    )
    recorder = Recorder()
    grid = InProcessGrid(recorder, nodes, fault)
    give_identities(grid, nodes)
    FederatedRun(cfg, root / name, grid).execute()
    return (
        recorder,
        grid,
        _row(root / name),
        load_file(str(root / name / "rounds/1/adapter_model.safetensors")),
    )


def give_identities(grid: InProcessGrid, nodes: dict[int, dict]) -> EphemeralFederation:
    """Each site's own identity in its node state (what a SuperNode's node config names): the
    coordinator never sees the identity CA's key."""
    fed = ephemeral_federation([c["site-name"] for c in nodes.values()])
    for node, conf in nodes.items():
        key_pem, cert_pem = fed.identities[conf["site-name"]]
        grid.contexts[node].state[keys.STATE_IDENTITY] = ConfigRecord(
            {keys.IDENTITY_KEY: key_pem, keys.IDENTITY_CERT: cert_pem, keys.CA_CERT: fed.ca_cert}
        )
    return fed


def expected_adapter(plain: Recorder, contributors: list[int]) -> dict[str, np.ndarray]:
    """Numpy reference: global + sum_i r_i delta_i / sum_i r_i over the contributors (lr 1)."""
    weights = np.array([plain.records[n] for n in contributors], dtype=np.float64)
    weights /= weights.sum()
    out = {}
    for key, glob in plain.sent[contributors[0]].items():
        deltas = [plain.updates[n][key].astype(np.float64) for n in contributors]
        out[key] = (glob + sum(w * d for w, d in zip(weights, deltas, strict=True))).astype(
            np.float32
        )
    return out


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], bound: float) -> float:
    """max |got - want| over the exchanged keys; within bound + 2 float32 ulps of the adapter."""
    worst = 0.0
    for key, ref in want.items():
        diff = np.abs(got[key].astype(np.float64) - ref)
        ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
        assert (diff <= bound + 2 * ulp).all(), (key, float(diff.max()), bound)
        worst = max(worst, float(diff.max()))
    return worst


def _row(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def drop(stage: str, node: int = 101):
    return lambda n, msg: "drop" if n == node and msg.metadata.message_type == stage else None


def test_threshold_is_a_majority_fraction_never_below_two(base):
    cfg = base[0]
    assert [threshold_for(cfg, n) for n in (1, 2, 3, 10)] == [2, 2, 2, 7]
    # SecAgg+: a majority of each neighbourhood (the site and its k neighbours), not of n.
    sparse = cfg.model_copy(update={"secagg": cfg.secagg.model_copy(update={"neighbours": 4})})
    assert [threshold_for(sparse, n) for n in (5, 6, 40)] == [4, 4, 4]
    assert all(2 * threshold_for(sparse, n) > 5 for n in (6, 40))


def test_secure_round_equals_the_plain_round_within_the_bound(base, plain):
    rec_plain, row_plain = plain
    rec, grid, row, adapter = secure(base, "full")
    want = load_file(str(base[2] / "plain/rounds/1/adapter_model.safetensors"))
    bound = row["secagg_error_bound"]
    assert 0 < bound < 1e-7
    worst = assert_close(
        adapter, {k: want[k].astype(np.float64) for k in rec_plain.sent[100]}, bound
    )
    assert row["sites"] == row_plain["sites"] == ["site-0", "site-1", "site-2"]
    assert row["secagg_dropped"] == {} and row["secagg_clipped"] == 0
    assert row["train_loss"] is None  # site losses are not private: not reported under secagg
    assert row_plain["train_loss"] is not None
    types = [m.metadata.message_type for m in grid.sent[3:]]  # after preflight
    # keys, train, then the unmask query twice: sign the survivor lists, then reveal.
    assert types == ["query.secagg_keys"] * 3 + ["train"] * 3 + ["query.secagg_unmask"] * 6
    survivors = [m for m in grid.sent if "secagg-survivors" in m.content.config_records]
    assert len(survivors) == 3 and grid.sent[-6:-3] == survivors
    train_replies = [r for r in rec.replies if r.metadata.message_type == "train"]
    assert all("update" not in r.content for r in train_replies)  # no plaintext update left
    ratio = row["bytes_up"] / row_plain["bytes_up"]
    assert 0.5 < ratio < 1.2  # one flat masked vector + shares vs one array per LoRA module
    print(f"\nmax |secagg - plain| {worst:.3g} (bound {bound:.3g}); bytes up ratio {ratio:.4f}")


def test_a_site_dropping_after_keys_is_left_out_and_the_sum_is_exact(base, plain):
    rec_plain, _ = plain
    _, _, row, adapter = secure(base, "drop-keys", drop("train"), min_sites=2)
    assert row["sites"] == ["site-0", "site-2"] and row["secagg_dropped"] == {"site-1": "train"}
    assert "site-1" in row["sites_failed"]
    assert_close(adapter, expected_adapter(rec_plain, [100, 102]), row["secagg_error_bound"])


def test_a_site_dropping_after_upload_still_counts(base, plain):
    rec_plain, _ = plain
    _, _, row, adapter = secure(base, "drop-unmask", drop("query.secagg_unmask"), min_sites=2)
    assert row["sites"] == ["site-0", "site-1", "site-2"]
    # Its first unmask-query message (sign the lists) is lost: it is still in the sum.
    assert row["secagg_dropped"] == {"site-1": "survivors"} and row["sites_failed"] == {}
    assert_close(adapter, expected_adapter(rec_plain, list(NODES)), row["secagg_error_bound"])


def test_too_few_survivors_aborts_the_round(base):
    fault = lambda n, msg: "drop" if n != 100 and msg.metadata.message_type == "train" else None  # noqa: E731
    with pytest.raises(
        RoundError, match="round 1: secure aggregation aborted: .*fewer than `threshold` 2"
    ):
        secure(base, "too-few", fault, min_sites=1)
    assert not (base[2] / "too-few" / "rounds" / "1").exists()
