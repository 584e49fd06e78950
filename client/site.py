"""One site's work, independent of Flower: identity, data, model, local round.

The base model is loaded once per process and reused across rounds (a Ray actor in simulation
serves many rounds; in deployment each message is a new process and loads it once).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from client.dp import DPStepper
from client.privacy_site import (
    SiteAccountant,
    check_budget,
    noise_at_site,
    privatize_update,
)
from client.train import TrainResult, train_round
from common.core.adapters import (
    attach_lora,
    exchanged_keys,
    flatten,
    frozen_fingerprint,
    get_state,
    set_state,
    unflatten,
)
from common.core.config import Config
from common.core.errors import DataError, ModelError
from common.core.models import load_base
from common.core.records import Record
from common.core.tasks import Encoded, encode
from common.dataprep.onthefly import load_prepared

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteInfo:
    name: str
    data_dir: Path
    index: int  # stable per site; seeds its data order
    state_dir: Path | None = None  # where the site keeps its privacy accountant between restarts
    run_key: str = ""

    def state_file(self) -> Path | None:
        if self.state_dir is None:
            return None
        return self.state_dir / f"accountant-{self.run_key or 'default'}.json"

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], data_root: str = "", run_key: str = ""
    ) -> SiteInfo:
        """Deployment: `data-dir`, `site-name`, `state-dir` in node config. Simulation: the
        partition id names the site and its folder under ``data_root``."""
        pid = int(node_config.get("partition-id", 0))
        name = str(node_config.get("site-name", f"site-{pid}"))
        default_state = Path.home() / ".cache" / "fedtune" / "site-state" / name
        state = Path(str(node_config.get("state-dir", default_state)))
        if "data-dir" in node_config:
            return cls(name, Path(str(node_config["data-dir"])), pid, state, run_key)
        if data_root:
            sim_state = Path(data_root).parent / "site-state" / name
            return cls(name, Path(data_root) / name, pid, sim_state, run_key)
        raise DataError(
            "this site has no data folder: start the SuperNode with "
            "--node-config \"data-dir='/path/to/records' site-name='my-hospital'\""
        )


@dataclass
class SiteModel:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    keys: list[str]
    fingerprint: str


_MODELS: dict[str, SiteModel] = {}


def _model_key(cfg: Config) -> str:
    return repr((cfg.model.model_dump(), cfg.lora.model_dump(), cfg.data.labels))


def site_model(cfg: Config) -> SiteModel:
    """The base model with adapters, loaded once per process for a given model/LoRA config."""
    key = _model_key(cfg)
    if key not in _MODELS:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        loaded = load_base(cfg.model, cfg.data.labels)
        peft = attach_lora(loaded.model, cfg.lora, cfg.model)
        _MODELS.clear()  # one model per process: free the previous one
        _MODELS[key] = SiteModel(
            peft,
            loaded.tokenizer,
            exchanged_keys(peft, cfg.lora),
            frozen_fingerprint(peft, cfg.lora),
        )
    return _MODELS[key]


def load_records(site: SiteInfo, cfg: Config) -> list[Record]:
    """The site's records; prepared on the fly when `data.prepare` enables a rule."""
    records, _ = load_prepared(site.data_dir, cfg.data)
    return records


def split_eval(records: list[Record], cfg: Config, seed: int) -> tuple[list[Record], list[Record]]:
    if not cfg.data.eval_fraction:
        return records, []
    order = np.random.default_rng(seed).permutation(len(records))
    n_eval = int(len(records) * cfg.data.eval_fraction)
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def check_site(site: SiteInfo, cfg: Config) -> dict[str, Any]:
    """Preflight: data readable and valid (read as training reads it), model loadable.

    Returns counts only, with those of `data.prepare` when a rule is on (never contents).
    """
    records, prepare_counts = load_prepared(site.data_dir, cfg.data)
    sm = site_model(cfg)
    encoded = encode(records, sm.tokenizer, cfg)
    train, held = split_eval(records, cfg, cfg.train.seed + site.index)
    info: dict[str, Any] = {
        "records": len(train),
        "eval-records": len(held),
        "max-tokens": max(len(e.input_ids) for e in encoded),
        "fingerprint": sm.fingerprint,
    }
    info.update({f"prepare:{k}": v for k, v in prepare_counts.items()})
    return info


@dataclass
class LocalUpdate:
    delta: dict[str, np.ndarray]
    result: TrainResult | None
    records: int
    declined: str | None = None
    privacy: dict[str, float] = field(default_factory=dict)


def run_local_round(
    site: SiteInfo,
    cfg: Config,
    global_state: dict[str, np.ndarray],
    round_idx: int,
    fingerprint: str,
    privacy_state: dict[str, Any] | None = None,
    budget: float | None = None,
) -> LocalUpdate:
    """Set the global adapter, train locally (one loop; DP-SGD steps if configured), return new
    minus global.

    With institution-level DP the whole update is clipped to C (and noised at the site when the
    noise is distributed) before it leaves. A site over its record-level budget declines.
    """
    sm = site_model(cfg)
    if fingerprint != sm.fingerprint:
        raise ModelError(
            "this site's frozen LoRA A differs from the coordinator's: check that both use the "
            "same base model, `lora` settings and fedtune version"
        )
    set_state(sm.model, global_state)
    train, _ = split_eval(load_records(site, cfg), cfg, cfg.train.seed + site.index)
    examples: list[Encoded] = encode(train, sm.tokenizer, cfg)
    pad = int(sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else 0)
    seed = cfg.train.seed + 1000 * round_idx + site.index
    acc: SiteAccountant | None = None
    stepper: DPStepper | None = None  # None: plain steps
    if cfg.privacy.record.enabled:
        acc = SiteAccountant(privacy_state if privacy_state is not None else {},
                             site.state_file(), cfg.privacy.record.accountant)  # fmt: skip
        plan, reason = check_budget(acc, cfg, len(examples), budget)
        if reason:
            logger.warning("site %s: %s", site.name, reason)
            return LocalUpdate({}, None, len(train), declined=reason)
        stepper = DPStepper(cfg.privacy.record, plan, acc.accountant)
    result = train_round(
        sm.model, examples, cfg.train, pad_id=pad, round_idx=round_idx,
        total_rounds=cfg.federation.rounds, seed=seed, stepper=stepper,
    )  # fmt: skip
    privacy: dict[str, float] = {}
    if acc is not None:
        acc.save()  # epsilon composes over rounds and process restarts
        privacy = {"record-epsilon": acc.accountant.epsilon(plan.delta), "record-delta": plan.delta}
    new_state = get_state(sm.model, sm.keys)
    delta = {k: new_state[k] - global_state[k] for k in sm.keys}
    if cfg.privacy.institution.enabled:
        vec, norm = privatize_update(flatten(delta), cfg, noise_at_site(cfg))
        # The pre-clip norm is what institution-level DP hides: it stays here, in the local log.
        logger.debug("site %s: update norm %.4g before clipping", site.name, norm)
        delta = unflatten(vec, delta)
    return LocalUpdate(delta, result, len(train), privacy=privacy)
