"""`fedtune audit`: attack a trained model and set what the attacks learn beside its claim.

The run is a simulation like any other, with canaries (simulations/canaries.py) in the virtual
sites' data. Afterwards the auditor, who knows which canaries were trained on, scores:

- each canary's secret (its label, or its six-digit answer) by the model's log-likelihood, and
  by the likelihood ratio against the base model (the offline, one-reference form of the LiRA
  test of Carlini et al. 2022: the base model is the reference, no shadow models are trained);
- real training records against held-out ones (the run's test folder) with the same two
  scores: the membership-inference attack;
- each canary's secret against candidate secrets: exposure (Carlini et al. 2019).

From the canaries it derives a lower bound on epsilon (common/privacy/audit.py) and puts it
beside the epsilon the run claims. The report goes to ``OUT/audit/report.json`` and
``report.md``; `fedtune publish --audit` writes it into the model card, and refuses a model
whose bound exceeds its claim.

What it audits: the record-level claim (one canary is one record), for holders of the model.
It cannot audit institution-level DP against a coordinator: that needs many more sites than
a simulation runs, one per canary.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common.core.config import Config
from common.core.errors import ConfigError
from common.core.records import Record, read_folder, to_record
from common.core.tasks import record_nll
from common.privacy import audit as stats
from simulations.canaries import SITE_FILE, Canary, check_auditable, read_canaries

logger = logging.getLogger(__name__)
DEFAULT_CANARIES = 200
ATTACKS = ("loss", "likelihood_ratio")


def audit_config(cfg: Config, canaries: int | None = None) -> Config:
    """``cfg`` with canaries on (``canaries``, else the config's own, else 200), checked."""
    audit = cfg.simulation.audit
    n = canaries if canaries is not None else (audit.canaries or DEFAULT_CANARIES)
    if n < 20:
        raise ConfigError(f"an audit needs at least 20 canaries (`--canaries` {n})")
    check_auditable(cfg)
    sim = cfg.simulation.model_copy(update={"audit": audit.model_copy(update={"canaries": n})})
    return cfg.model_copy(update={"simulation": sim})


def analyze(run_dir: Path, round_: int | None = None) -> dict[str, Any]:
    """Score the canaries and members of a finished audit run; the report as a dict."""
    from server.publishing.publish import merged_round, read_run, run_base

    info = read_run(run_dir, round_)
    cfg = info.cfg
    canaries = read_canaries(run_dir)
    logger.info("audit: scoring %d canaries and up to %d members", len(canaries),
                cfg.simulation.audit.members)  # fmt: skip
    _, model, tok = merged_round(run_dir, info.round)
    base = run_base(info)[0].eval()  # with the head's whitening map, if the run had one
    batch = cfg.evaluation.batch_size

    def scores(records: list[Record]) -> dict[str, np.ndarray]:
        trained = -np.asarray(record_nll(model, tok, records, cfg, batch))
        ref = -np.asarray(record_nll(base, tok, records, cfg, batch))
        return {"loss": trained, "likelihood_ratio": trained - ref}

    records = [_record(c.row, cfg, f"canary {i}") for i, c in enumerate(canaries)]
    canary_scores = scores(records)
    included = [c.included for c in canaries]
    claim = stats.claimed_epsilon(info.summary.get("privacy"))
    delta = claim["delta"] if claim else 1e-5
    one_run = {
        a: stats.one_run_audit(canary_scores[a], included, delta, beta=0.05 / len(ATTACKS))
        for a in ATTACKS
    }
    inc = np.asarray(included)
    canary_mia = {a: stats.membership(s[inc], s[~inc]) for a, s in canary_scores.items()}
    members, nonmembers = _members(run_dir, cfg)
    m_scores, n_scores = scores(members), scores(nonmembers)
    record_mia = {a: stats.membership(m_scores[a], n_scores[a]) for a in ATTACKS}
    bound = max(r.epsilon_lower_bound for r in one_run.values())
    report: dict[str, Any] = {
        "run_id": str(info.summary.get("run_id", "")),
        "round": info.round,
        "config_hash": cfg.digest(),
        "unit": "one record (a canary), add/remove adjacency, against holders of the model",
        "claimed": claim,
        "epsilon_lower_bound": bound,
        "consistent": claim is None or bound <= claim["epsilon"],
        "one_run": {a: r.to_dict() for a, r in one_run.items()},
        "canary_membership": canary_mia,
        "record_membership": record_mia,
        "mia_auc": max(v["auc"] for v in [*canary_mia.values(), *record_mia.values()]),
        "exposure": _exposure(model, tok, cfg, canaries, records, canary_scores["loss"]),
        "seed": cfg.simulation.audit.seed,
    }
    return report


def _record(row: dict[str, Any], cfg: Config, where: str) -> Record:
    form = "classification" if "label" in row else "instruction"
    return to_record(row, form, where, list(cfg.data.labels))


def _members(run_dir: Path, cfg: Config) -> tuple[list[Record], list[Record]]:
    """Real training records (never the canaries) and as many held-out test records, drawn
    with the audit's seed."""
    rng = np.random.default_rng(cfg.simulation.audit.seed + 1)
    pool: list[Record] = []
    for site in sorted((run_dir / "sites").iterdir()):
        if site.is_dir():
            pool += [r for r in read_folder(site, cfg.data.form, cfg.data.labels)
                     if not r.where.startswith(SITE_FILE)]  # fmt: skip
    test = list(read_folder(run_dir / "test", cfg.data.form, cfg.data.labels))
    n = min(cfg.simulation.audit.members, len(pool), len(test))
    if n < 10:
        raise ConfigError(f"the audit needs at least 10 training and 10 test records, has {n}")
    pick = lambda xs: [xs[i] for i in sorted(rng.choice(len(xs), n, replace=False))]  # noqa: E731
    return pick(pool), pick(test)


def _exposure(model, tok, cfg, canaries: list[Canary], records, loss_scores) -> dict[str, Any]:
    """Exposure of each canary's secret among its candidates: mean and max, trained on or not."""
    values = []
    for canary, record, score in zip(canaries, records, loss_scores, strict=True):
        alternatives = [_with_secret(record, s, cfg) for s in canary.candidates]
        others = -np.asarray(record_nll(model, tok, alternatives, cfg, cfg.evaluation.batch_size))
        values.append(stats.exposure(float(score), others))
    n = len(canaries[0].candidates) + 1 if canaries else 0
    out: dict[str, Any] = {"candidates": n, "max_possible": float(np.log2(n)) if n else 0.0}
    for name, keep in (("trained", True), ("not_trained", False)):
        chosen = [v for v, c in zip(values, canaries, strict=True) if c.included == keep]
        out[name] = {"canaries": len(chosen), "mean": float(np.mean(chosen)) if chosen else None,
                     "max": float(np.max(chosen)) if chosen else None}  # fmt: skip
    return out


def _with_secret(record: Record, secret: str, cfg: Config) -> Record:
    return replace(record, answer=secret, label=secret if record.label is not None else None)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    for path, text in ((js, json.dumps(report, indent=2)), (md, markdown(report))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return js, md


def markdown(report: dict[str, Any]) -> str:
    claim = report["claimed"]
    claimed = (f"epsilon {claim['epsilon']:.3f} at delta {claim['delta']:.1e} ({claim['from']})"
               if claim else "none (the run has no differential privacy)")  # fmt: skip
    verdict = (
        "consistent: the attacks found no more than the claim allows"
        if report["consistent"]
        else "**VIOLATED: the lower bound exceeds the claimed epsilon; the claim is false**"
    )
    lines = [
        f"# Empirical privacy audit (run {report['run_id']}, round {report['round']})", "",
        f"- Unit: {report['unit']}.",
        f"- Claimed: {claimed}.",
        f"- Empirical lower bound on epsilon: {report['epsilon_lower_bound']:.3f} "
        f"(95% confidence; one-run audit of Steinke, Nasr, Jagielski 2023).",
        f"- Verdict: {verdict}.", "",
        "A lower bound below the claim does not prove the claim: it says these attacks could not "
        "refute it. Attacks stronger than these can only raise the bound.", "",
        "## Canaries (one-run audit)", "",
        "| attack | canaries | trained on | guesses | correct | epsilon lower bound |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for attack, r in report["one_run"].items():
        lines.append(f"| {attack} | {r['canaries']} | {r['included']} | {r['guesses']} | "
                     f"{r['correct']} | {r['epsilon_lower_bound']:.3f} |")  # fmt: skip
    lines += ["", "## Membership inference", "",
              "| target | attack | AUC | TPR at 1% FPR | members | non-members |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for target, key in (("canaries", "canary_membership"), ("records", "record_membership")):
        for attack, r in report[key].items():
            lines.append(f"| {target} | {attack} | {r['auc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | "
                         f"{r['members']} | {r['nonmembers']} |")  # fmt: skip
    e = report["exposure"]
    top = f"{e['max_possible']:.2f}"
    lines += ["", "## Exposure (Carlini et al. 2019)", "",
              f"Each secret ranked among {e['candidates']} candidates (at most {top} bits; "
              "about 1 when the model knows nothing).", ""]  # fmt: skip
    for name in ("trained", "not_trained"):
        x = e[name]
        if x["canaries"]:
            lines.append(f"- {name.replace('_', ' ')}: {x['canaries']} canaries, mean "
                         f"{x['mean']:.2f} bits, max {x['max']:.2f} bits")  # fmt: skip
    return "\n".join(lines) + "\n"
