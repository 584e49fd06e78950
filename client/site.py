"""One site's work, independent of Flower: identity, data, model, local round.

The base model is loaded once per process and reused across rounds (a Ray actor in simulation
serves many rounds; in deployment each message is a new process and loads it once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from client.dp import DPStepper
from client.parallel import train_site_round
from client.policy import POLICY_FILE, SitePolicy, read_policy
from client.privacy_site import (
    SiteLedger,
    admit,
    open_ledger,
    privatize_update,
    round_steps,
)
from client.train import TrainResult
from common.core import headinput
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
from common.core.config.simulation import VIRTUAL_SITE_POLICY
from common.core.errors import DataError, ModelError, PrivacyError
from common.core.models import load_base
from common.core.records import Record
from common.core.tasks import Encoded, encode, evaluate
from common.dataprep.onthefly import load_prepared
from common.privacy.accounting import GaussianAccountant, RecordPlan
from common.protocol import keys

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteInfo:
    name: str
    data_dir: Path
    index: int  # stable per site; seeds its data order
    state_dir: Path | None = None  # the site's ledger folder (None: the policy's default)
    run_key: str = ""  # the coordinator's run id: names this run's entry in the ledger, only
    policy: SitePolicy = field(default_factory=SitePolicy)
    legacy_dirs: tuple[Path, ...] = ()  # older fedtune's state folders, read into the ledger

    @property
    def ledger_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.policy.ledger_dir(self.name)

    def ledger(self) -> AbstractContextManager[SiteLedger]:
        """This site's ledger for its dataset, locked while the block runs."""
        return open_ledger(self.ledger_dir, self.policy.dataset_id, self.legacy_dirs)

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], data_root: str = "", run_key: str = ""
    ) -> SiteInfo:
        """Deployment: `data-dir`, `site-name`, `policy-file` and the policy keys in node config
        (client/policy.py). Simulation: the partition id names the site, its folder is under
        ``data_root`` and its policy file beside it (written by the scenario's `prepare`)."""
        pid = int(node_config.get("partition-id", 0))
        name = str(node_config.get("site-name", f"site-{pid}"))
        file = node_config.get(POLICY_FILE)
        if "data-dir" in node_config:
            policy = read_policy(node_config, Path(str(file)) if file else None)
            data = Path(str(node_config["data-dir"]))
            return cls(name, data, pid, policy.ledger_dir(name), run_key, policy)
        if data_root:
            run_dir = Path(data_root).parent
            virtual = run_dir / VIRTUAL_SITE_POLICY.format(site=name)
            policy_file = Path(str(file)) if file else (virtual if virtual.is_file() else None)
            policy = read_policy(node_config, policy_file)
            legacy = (run_dir / "site-state" / name,)  # where older versions kept it
            data = Path(data_root) / name
            return cls(name, data, pid, policy.ledger_dir(name), run_key, policy, legacy)
        raise DataError(
            "this site has no data folder: start the SuperNode with "
            "--node-config \"data-dir='/path/to/records' site-name='my-hospital'\""
        )


@dataclass
class SiteModel:
    model: nn.Module  # a PEFT model, or the base itself (`partial` / `full`)
    tokenizer: PreTrainedTokenizerBase
    keys: list[str]
    fingerprint: str
    encoded: dict[str, list[Encoded]] = field(default_factory=dict)

    def encode(self, records: list[Record], cfg: Config) -> list[Encoded]:
        """:func:`encode`, once per process for the same records and data settings: tokenizing
        a site's records every round cost more than a round's step with `train.cache_frozen`."""
        h = hashlib.blake2b(repr(cfg.data.model_dump()).encode(), digest_size=16)
        for r in records:
            h.update(json.dumps([r.messages, r.answer, r.label]).encode())
        key = h.hexdigest()
        if key not in self.encoded:
            if len(self.encoded) >= ENCODED_KEPT:
                self.encoded.pop(next(iter(self.encoded)))
            self.encoded[key] = encode(records, self.tokenizer, cfg)
        return self.encoded[key]


_MODELS: dict[str, SiteModel] = {}
FROZEN_CACHE = "frozen-cache"  # `train.cache_frozen`'s files, in the site's state folder
ENCODED_KEPT = 8  # record sets whose encoding a site process keeps (the sites it serves)


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


def receive_whitening(cfg: Config, raw: object) -> None:
    """`model.head_input = "whitened"`: the coordinator's map (CONFIG's `head-whitening`) onto
    this process' model, before anything runs it. Whatever map it sends, DP-SGD clips and
    noises the head's own gradients (common/core/headinput.py)."""
    if cfg.model.head_input != "whitened":
        return
    model = site_model(cfg).model
    before = headinput.whitening_of(model)
    headinput.receive(model, raw)
    after = headinput.whitening_of(model)
    if before is None or after is None or not torch.equal(before, after):
        digest = hashlib.sha256(raw if isinstance(raw, bytes) else b"").hexdigest()
        logger.info("head whitening map from the coordinator: sha256 %s (the model card's)", digest)


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


def private(cfg: Config) -> bool:
    """Any DP level on: a site sends only what the accounting covers (no counts, no losses)."""
    return cfg.privacy.record.enabled or cfg.privacy.institution.enabled


@dataclass(frozen=True)
class Preflight:
    info: dict[str, Any]  # the SITE record
    refusal: str | None  # why this site will decline the run's rounds (its policy), else None


def preflight(site: SiteInfo, cfg: Config) -> Preflight:
    """Data readable and valid (read as training reads it), model loadable, and the run checked
    against the site's policy and ledger as its first round would be.

    The info holds counts only (with those of `data.prepare` when a rule is on), never contents;
    under any DP level not even counts: the guarantee does not cover them (adding one record
    changes them), so only the name (added by the handler) and the model fingerprint are sent.
    """
    records, prepare_counts = load_prepared(site.data_dir, cfg.data)
    sm = site_model(cfg)
    encoded = encode(records, sm.tokenizer, cfg)
    train, held = split_eval(records, cfg, cfg.train.seed + site.index)
    with _ledger(site, cfg) as ledger:
        _, refusal = admit(site.policy, ledger, cfg, len(train), site.run_key)
    if refusal:
        logger.warning("site %s: %s", site.name, refusal)
    if private(cfg):
        return Preflight({keys.FINGERPRINT: sm.fingerprint}, refusal)
    info: dict[str, Any] = {
        keys.RECORDS: len(train),
        keys.EVAL_RECORDS: len(held),
        keys.MAX_TOKENS: max(len(e.input_ids) for e in encoded),
        keys.FINGERPRINT: sm.fingerprint,
    }
    info.update({f"{keys.PREPARE_PREFIX}{k}": v for k, v in prepare_counts.items()})
    return Preflight(info, refusal)


def check_site(site: SiteInfo, cfg: Config) -> dict[str, Any]:
    """The preflight's SITE record (see :func:`preflight`)."""
    return preflight(site, cfg).info


@dataclass
class LocalUpdate:
    delta: dict[str, np.ndarray]
    result: TrainResult | None
    records: int
    declined: str | None = None
    privacy: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)  # the received global, held out


def run_local_round(
    site: SiteInfo,
    cfg: Config,
    global_state: dict[str, np.ndarray],
    round_idx: int,
    fingerprint: str,
) -> LocalUpdate:
    """Set the global adapter, train locally (one loop; DP-SGD steps if configured), return new
    minus global.

    A round the site's policy refuses (the run asks for less protection, or it would pass a
    budget) is declined with the reason. Under record-level DP the round's steps are charged to
    the site's ledger before training. With institution-level DP the whole update is clipped to
    C (and noised at the site when the noise is distributed) before it leaves.
    """
    sm = site_model(cfg)
    if fingerprint != sm.fingerprint:
        raise ModelError(
            "this site's frozen LoRA A differs from the coordinator's: check that both use the "
            "same base model, `lora` settings and fedtune version"
        )
    set_state(sm.model, global_state)
    train, held = split_eval(load_records(site, cfg), cfg, cfg.train.seed + site.index)
    evaluation = evaluate_held(sm, cfg, held)
    examples = sm.encode(train, cfg)
    pad = int(sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else 0)
    seed = cfg.train.seed + 1000 * round_idx + site.index
    privacy: dict[str, float] = {}
    with _ledger(site, cfg) as ledger:
        plan, reason = admit(site.policy, ledger, cfg, len(examples), site.run_key)
        if reason:
            logger.warning("site %s: %s", site.name, reason)
            return LocalUpdate({}, None, len(train), declined=reason)
        if plan is not None and ledger is not None:
            # Charged before training, under the ledger's lock: a crash cannot lose it.
            ledger.charge(site.run_key, round_steps(plan), plan, site.policy)
            run_eps = ledger.run_accountant(site.run_key).epsilon(plan.delta)
            privacy = {keys.RECORD_EPSILON: run_eps, keys.RECORD_DELTA: plan.delta}
    taken = GaussianAccountant(cfg.privacy.record.accountant)
    stepper = (
        DPStepper(cfg.privacy.record, plan, taken, width=cfg.model.max_length)
        if plan is not None
        else None
    )
    result = train_site_round(
        sm.model, examples, cfg.train, pad_id=pad, round_idx=round_idx,
        total_rounds=cfg.federation.rounds, seed=seed, stepper=stepper,
        cache_dir=site.ledger_dir / FROZEN_CACHE,
    )  # fmt: skip
    if plan is not None:
        _check_charged(site, plan, taken)
    new_state = get_state(sm.model, sm.keys)
    delta = {k: new_state[k] - global_state[k] for k in sm.keys}
    if cfg.privacy.institution.enabled:
        vec, norm = privatize_update(flatten(delta), cfg)
        # The pre-clip norm is what institution-level DP hides: it stays here, in the local log.
        logger.debug("site %s: update norm %.4g before clipping", site.name, norm)
        delta = unflatten(vec, delta)
    return LocalUpdate(delta, result, len(train), privacy=privacy, evaluation=evaluation)


def evaluate_held(sm: SiteModel, cfg: Config, held: list[Record]) -> dict[str, float]:
    """The model as it stands on the site's held-out records (`data.eval_fraction`); {} if none."""
    if not held:
        return {}
    result = evaluate(sm.model, sm.tokenizer, held, cfg, cfg.evaluation.batch_size)  # type: ignore[arg-type]
    sm.model.train()
    return result


def evaluate_global(
    site: SiteInfo, cfg: Config, global_state: dict[str, np.ndarray], fingerprint: str
) -> dict[str, float]:
    """The final global model on this site's held-out split (the `evaluate` message)."""
    sm = site_model(cfg)
    if fingerprint != sm.fingerprint:
        raise ModelError("this site's frozen LoRA A differs from the coordinator's")
    set_state(sm.model, global_state)
    _, held = split_eval(load_records(site, cfg), cfg, cfg.train.seed + site.index)
    return evaluate_held(sm, cfg, held)


def _ledger(site: SiteInfo, cfg: Config) -> AbstractContextManager[SiteLedger | None]:
    """The site's locked ledger under record-level DP (None without it: nothing to charge)."""
    if not cfg.privacy.record.enabled:
        return contextlib.nullcontext(None)
    return site.ledger()


def _check_charged(site: SiteInfo, plan: RecordPlan, taken: GaussianAccountant) -> None:
    """DP-SGD took exactly the steps charged before it started; otherwise what it took is
    charged as well and no update leaves."""
    if taken.history == round_steps(plan):
        return
    with site.ledger() as ledger:
        ledger.charge(site.run_key, list(taken.history), plan, site.policy)
    raise PrivacyError(
        f"DP-SGD took {taken.history} instead of the {round_steps(plan)} charged; the steps "
        "taken are charged as well and this round's update is withheld"
    )
