"""A site's privacy machinery around the local round: its ledger and budget, update clipping.

DP-SGD itself is ``client.dp.DPStepper``, the step of the one training loop under record-level DP.

The ledger is keyed by what it protects: one per dataset (``dataset-id`` in the site's policy,
``default`` unless the operator declares several) in the site's state folder. Nothing the
coordinator sends (run id, config, run folder) chooses the file, and editing the records does not
start a fresh one. Every run, restart and resume appends its DP-SGD steps to one history, and the
site's cap is checked against the epsilon of that whole history (composing the runs' mechanisms
in one RDP accountant is tighter than summing their epsilons, and as valid). Per-run histories are
kept beside it: a run's own epsilon is what its model's guarantee states. A round's steps are
charged, under a file lock and written atomically, before training starts: a crash or a
concurrent run can never lose spent budget.

Accountant files of earlier fedtune versions (``accountant-<run id>.json``, anywhere below the
state folder: a run id with a slash made a subfolder) are read into the ledger as runs of their
own, so budget they spent is not lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from client.policy import SitePolicy, refusals
from common.core.config import Config
from common.core.config.simulation import DATASET_ID
from common.core.errors import PrivacyError
from common.privacy.accounting import (
    DELTA_CAP,
    GaussianAccountant,
    Mechanism,
    RecordPlan,
    clip_update,
    decline_reason,
    record_plan,
)

logger = logging.getLogger(__name__)

LEDGER_MECHANISM: Mechanism = "rdp"  # the site's own accountant, whatever the run uses
LEDGER_VERSION = 1
LEGACY_PREFIX = "accountant-"
PLANNED = "(planned run)"  # the run key of `privacy-report --plan`'s look ahead
Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps): Opacus' history entry


@dataclass
class LedgerRun:
    """One run's part of the ledger (for display, and the run's own guarantee)."""

    history: list[Step] = field(default_factory=list)
    rounds: int | None = 0  # None: read from an old accountant file (rounds not recorded)
    delta: float | None = None  # the run's record-level delta
    updated: str = ""

    def epsilon(self, delta: float) -> float:
        return _accountant(self.history).epsilon(delta)


class SiteLedger:
    """Everything one dataset of a site has spent at record level, over every run."""

    def __init__(self, path: Path, dataset: str) -> None:
        self.path, self.dataset = path, dataset
        self.runs: dict[str, LedgerRun] = {}
        self.migrated: list[str] = []  # old accountant files already read in (absolute paths)
        self.resets: list[str] = []  # when the operator reset it (`fedtune ledger reset`)
        self.site_delta: float | None = None  # the site's delta at the last charge (display)
        self.max_epsilon: float | None = None  # the site's cap at the last charge (display)

    # -- reading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: Path, dataset: str, legacy: Iterable[Path] = ()) -> SiteLedger:
        """The dataset's ledger in ``state_dir`` (empty if none), with old accountant files of
        ``state_dir`` and the ``legacy`` folders read in."""
        ledger = cls(ledger_path(state_dir, dataset), dataset)
        if ledger.path.is_file():
            ledger._load_dict(_read_json(ledger.path))
        for folder in (state_dir, *legacy):
            ledger._migrate(folder)
        return ledger

    def _load_dict(self, data: dict[str, Any]) -> None:
        if data.get("version") != LEDGER_VERSION or data.get("dataset") != self.dataset:
            raise PrivacyError(
                f"`{self.path}` is not a version-{LEDGER_VERSION} ledger of dataset "
                f"`{self.dataset}`: refusing to guess what it has spent"
            )
        for key, run in data["runs"].items():
            history = [(float(s), float(q), int(n)) for s, q, n in run["history"]]
            self.runs[key] = LedgerRun(history, run["rounds"], run["delta"], run["updated"])
        self.migrated, self.resets = list(data["migrated"]), list(data["resets"])
        self.site_delta, self.max_epsilon = data["site_delta"], data["max_epsilon"]

    def _migrate(self, folder: Path) -> None:
        """Read old ``accountant-*.json`` files below ``folder`` in as runs of their own."""
        for path in legacy_files(folder):
            key = str(path.resolve())
            if key in self.migrated:
                continue
            acc = GaussianAccountant.from_bytes(path.read_bytes())
            self.runs[f"legacy:{key}"] = LedgerRun(acc.history, None, None, _mtime(path))
            self.migrated.append(key)
            logger.info("ledger %s: read earlier spending from %s", self.path, path)

    # -- what was spent ----------------------------------------------------------------------
    def accountant(self) -> GaussianAccountant:
        """One accountant over every run's steps: epsilon of the records' whole exposure."""
        return _accountant([s for run in self.runs.values() for s in run.history])

    def run_accountant(self, run_key: str) -> GaussianAccountant:
        run = self.runs.get(run_key)
        return _accountant(run.history if run else [])

    @property
    def rounds(self) -> int:
        return sum(r.rounds or 0 for r in self.runs.values())

    # -- writing -----------------------------------------------------------------------------
    def charge(self, run_key: str, steps: list[Step], plan: RecordPlan, policy: SitePolicy) -> None:
        """Add one round's DP-SGD steps to run ``run_key`` and write the ledger (atomically)."""
        run = self.runs.setdefault(run_key, LedgerRun())
        run.history += steps
        run.rounds = (run.rounds or 0) + 1
        run.delta, run.updated = plan.delta, _now()
        self.site_delta = policy.delta_cap(plan.num_records)
        self.max_epsilon = policy.max_epsilon
        self.save()

    def reset(self) -> None:
        """Forget every run (the operator's explicit decision); old files stay read in."""
        self.runs.clear()
        self.resets.append(_now())
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "dataset": self.dataset,
            "mechanism": LEDGER_MECHANISM,
            "site_delta": self.site_delta,
            "max_epsilon": self.max_epsilon,
            "runs": {k: _run_dict(r) for k, r in self.runs.items()},
            "migrated": self.migrated,
            "resets": self.resets,
        }


def _run_dict(run: LedgerRun) -> dict[str, Any]:
    history = [list(s) for s in run.history]
    return {"history": history, "rounds": run.rounds, "delta": run.delta, "updated": run.updated}


def ledger_path(state_dir: Path, dataset: str) -> Path:
    return state_dir / f"ledger-{dataset}.json"


def legacy_files(folder: Path) -> list[Path]:
    """Old accountant files below ``folder``: ``accountant-<run id>.json``, where a run id with
    slashes made ``accountant-<a>/<b>.json``."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*.json")
        if any(part.startswith(LEGACY_PREFIX) for part in p.relative_to(folder).parts)
    )


@contextlib.contextmanager
def open_ledger(state_dir: Path, dataset: str, legacy: Iterable[Path] = ()) -> Iterator[SiteLedger]:
    """The dataset's ledger, locked against other processes of the site until the block ends."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / f".ledger-{dataset}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield SiteLedger.load(state_dir, dataset, legacy)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def datasets(state_dir: Path) -> list[str]:
    """The dataset ids with a ledger in ``state_dir`` (``default`` if only old files exist)."""
    if not state_dir.is_dir():
        raise PrivacyError(f"`{state_dir}` is not a folder (a site's `state-dir`)")
    found = sorted(p.name[len("ledger-") : -len(".json")] for p in state_dir.glob("ledger-*.json"))
    if not found and legacy_files(state_dir):
        found = ["default"]
    return found


@dataclass(frozen=True)
class DatasetReport:
    """What `fedtune ledger show` prints for one dataset."""

    dataset: str
    runs: dict[str, tuple[int | None, float | None]]  # run -> (rounds, epsilon at its delta)
    rounds: int
    delta: float  # the site's delta at the last charge (else the default cap)
    epsilon: float  # over all runs, at ``delta``
    max_epsilon: float | None
    resets: list[str]

    @property
    def remaining(self) -> float | None:
        return None if self.max_epsilon is None else max(0.0, self.max_epsilon - self.epsilon)


def ledger_report(state_dir: Path) -> list[DatasetReport]:
    """Every dataset's ledger in ``state_dir`` (read only; old accountant files included)."""
    out = []
    for dataset in datasets(state_dir):
        ledger = SiteLedger.load(state_dir, dataset)
        delta = ledger.site_delta if ledger.site_delta is not None else DELTA_CAP
        runs = {
            k: (r.rounds, r.epsilon(r.delta) if r.delta is not None else None)
            for k, r in ledger.runs.items()
        }
        eps = ledger.accountant().epsilon(delta)
        out.append(
            DatasetReport(dataset, runs, ledger.rounds, delta, eps, ledger.max_epsilon,
                          ledger.resets)
        )  # fmt: skip
    return out


def reset_ledger(state_dir: Path, dataset: str) -> DatasetReport:
    """Forget what ``dataset`` has spent (operator only); returns what it had spent."""
    if not re.fullmatch(DATASET_ID, dataset):
        raise PrivacyError(f"`--dataset` must match {DATASET_ID} (got {dataset!r})")
    known = datasets(state_dir)
    if dataset not in known:
        raise PrivacyError(
            f"`{state_dir}` has no ledger for dataset `{dataset}` "
            f"(it has: {', '.join(known) or 'none'})"
        )
    before = next(r for r in ledger_report(state_dir) if r.dataset == dataset)
    with open_ledger(state_dir, dataset) as ledger:
        ledger.reset()
    logger.warning("ledger %s reset by the operator", ledger_path(state_dir, dataset))
    return before


# ---------------------------------------------------------------- the site's decision


def admit(
    policy: SitePolicy, ledger: SiteLedger | None, cfg: Config, records: int, run_key: str
) -> tuple[RecordPlan | None, str | None]:
    """The round's record-level plan (None without record DP) and, if the site must decline,
    why: the run asks for less than ``policy``, or the next round would pass a budget."""
    plan = None
    if cfg.privacy.record.enabled:
        try:
            plan = record_plan(cfg, records)
        except PrivacyError as err:
            return None, f"declining to train: {err}"
    problems = refusals(policy, cfg, plan)
    if problems:
        return plan, "declining to train: " + "; ".join(problems)
    if plan is not None and ledger is not None:
        run_cap = cfg.privacy.record.budget_epsilon
        return plan, budget_refusal(ledger, policy, plan, run_key, run_cap)
    return plan, None


def budget_refusal(
    ledger: SiteLedger,
    policy: SitePolicy,
    plan: RecordPlan,
    run_key: str,
    run_cap: float | None,
) -> str | None:
    """Why one more round of ``plan`` is refused: it would take the records' whole history past
    the site's ``max-epsilon`` (at the site's delta), or this run past its own
    `privacy.record.budget_epsilon`; else None."""
    cap = policy.max_epsilon
    if cap is not None:
        delta = policy.delta_cap(plan.num_records)
        total = ledger.accountant()
        after = total.projected_epsilon(
            steps=plan.steps_per_round, sample_rate=plan.sample_rate,
            noise_multiplier=plan.noise_multiplier, delta=delta,
        )  # fmt: skip
        if after > cap:
            return (
                f"declining to train: epsilon on these records over all runs would reach "
                f"{after:.3f} > this site's cap {cap:.3f} (`max-epsilon`; spent "
                f"{total.epsilon(delta):.3f} in {len(ledger.runs)} run(s), delta {delta:.2e})"
            )
    if run_cap is None:
        return None
    reason = decline_reason(ledger.run_accountant(run_key), plan, run_cap)
    return reason and f"{reason}: this run's `privacy.record.budget_epsilon`"


def plan_check(policy: SitePolicy, cfg: Config, records: int, site: str) -> str:
    """One line of `fedtune privacy-report --plan`: does the site's policy accept the run, and
    how many of its rounds fit the site's budget (its ledger as it is now; read only)."""
    state = policy.ledger_dir(site)
    ledger = SiteLedger.load(state, policy.dataset_id) if state.is_dir() else None
    ledger = ledger or SiteLedger(ledger_path(state, policy.dataset_id), policy.dataset_id)
    plan, reason = admit(policy, ledger, cfg, records, PLANNED)
    if reason:
        return f"{site}: refuse: {reason.removeprefix('declining to train: ')}"
    if plan is None or (policy.max_epsilon is None and cfg.privacy.record.budget_epsilon is None):
        return f"{site}: pass"
    spent = ledger.accountant().epsilon(policy.delta_cap(records))
    fits = 0
    while fits < plan.rounds and not budget_refusal(
        ledger, policy, plan, PLANNED, cfg.privacy.record.budget_epsilon
    ):
        ledger.runs.setdefault(PLANNED, LedgerRun()).history += round_steps(plan)  # not saved
        fits += 1
    cap = f" of the cap {policy.max_epsilon:.3f}" if policy.max_epsilon is not None else ""
    return (
        f"{site}: pass for {fits} of {plan.rounds} round(s) (epsilon {spent:.3f} spent on "
        f"these records{cap})"
    )


def round_steps(plan: RecordPlan) -> list[Step]:
    """What one round of ``plan`` charges: its logical DP-SGD steps."""
    return [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]


def _accountant(history: list[Step]) -> GaussianAccountant:
    acc = GaussianAccountant(LEDGER_MECHANISM)
    for sigma, q, n in history:
        acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
    return acc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as err:
        raise PrivacyError(f"ledger `{path}` is unreadable ({err}): refusing to train") from None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- institution level


def privatize_update(vec: np.ndarray, cfg: Config) -> tuple[np.ndarray, float]:
    """Institution-level DP at the site: clip the whole update to L2 norm C.

    The noise is added by the coordinator (server noise) or, under secure aggregation, by the
    site itself as it encodes the clipped update for the secure sum: the distributed discrete
    Gaussian (client/secagg_site.py, common/privacy/ddg.py)."""
    clipped, norm = clip_update(vec, cfg.privacy.institution.clip_norm)
    return clipped.astype(np.float32), norm
