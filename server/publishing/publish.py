"""``fedtune publish``: turn a finished run into a signed, servable Hugging Face folder.

Reads top to bottom: load the run, load the base model, evaluate it, apply the chosen round's
adapter, merge, evaluate again and gate, write everything into a hidden temporary sibling folder,
sign it, and only then rename it into place. A crash at any point leaves either nothing or a hidden
``.<name>.tmp-*`` folder without a signature: never a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core.config import Config, load_config
from common.core.errors import FedtuneError
from common.identity.signing import load_private_key, sign_folder
from server.publishing.model_card import render_model_card

logger = logging.getLogger(__name__)

Metrics = dict[str, Any]
EvaluateFn = Callable[[Any, Any, Config, list[Any]], Metrics]
LoadBaseFn = Callable[[Config], tuple[Any, Any]]


class PublishError(FedtuneError):
    """The run folder cannot be published (missing files, bad round, existing output)."""


class EvaluationGateError(PublishError):
    """The merged model is worse than the base model by more than the allowed margin."""


class AuditError(PublishError):
    """An audit refutes the run's privacy claim (or is not an audit of what is published)."""


@dataclass(frozen=True)
class RunInfo:
    """What publishing reads from a finished run folder."""

    run_dir: Path
    cfg: Config
    summary: dict[str, Any]
    round: int
    adapter_dir: Path
    test_records: list[Any]  # common.core.records.Record


def publish(
    run_dir: str | Path,
    out_dir: str | Path,
    signing_key: str | Path,
    round: int | None = None,
    force: bool = False,
    passphrase: str | None = None,
    *,
    margin: float = 0.01,
    loss_margin: float = 0.05,
    evaluate: EvaluateFn | None = None,
    load_base: LoadBaseFn | None = None,
    audit: str | Path | None = None,
    evaluation: str | Path | None = None,
) -> dict[str, Any]:
    """Merge the adapter of ``round`` into the base model and publish it signed (default: the
    best round of a run with `federation.early_stop`, else the last).

    Refuses (:class:`EvaluationGateError`) when held-out accuracy drops by more than ``margin``
    (absolute) or loss rises by more than ``loss_margin`` (relative) versus the base model, unless
    ``force``. ``audit``: a `fedtune audit` report of this run and round, written into the
    card; refused (:class:`AuditError`, never overridden by ``force``) when its lower bound on
    epsilon exceeds the epsilon the run claims. ``evaluation``: a `fedtune evaluate` report of
    this run and round, written into the card. Returns the signed manifest.
    """
    out = Path(out_dir)
    _check_out_dir(out)
    load_private_key(signing_key, passphrase)  # fail on a wrong key or passphrase before heavy work
    key = Path(signing_key)
    info = read_run(run_dir, round)
    audit_report = _read_report(audit, info, "audit") if audit else None
    if audit_report is not None:
        check_audit(audit_report, info.summary)
    eval_report = _read_report(evaluation, info, "evaluation") if evaluation else None
    model, tokenizer = run_base(info, load_base)
    evaluate = evaluate or _default_evaluate
    before = evaluate(model, tokenizer, info.cfg, info.test_records)
    merged = _merge_adapter(model, info.adapter_dir)
    after = evaluate(merged, tokenizer, info.cfg, info.test_records)
    check_gate(before, after, margin, loss_margin, force)
    extra = {"run_id": str(info.summary.get("run_id", "")), "round": info.round}
    extra["config_hash"] = info.cfg.digest()
    extra["evaluation"] = {"base": _jsonable(before), "published": _jsonable(after)}
    extra["privacy"] = _privacy_statement(info.summary)
    if audit_report is not None:
        extra["audit"] = {k: audit_report[k] for k in ("epsilon_lower_bound", "claimed", "mia_auc")}
    from common.core.pooling import CONFIG_KEY

    card = render_model_card(
        info.cfg, info.summary, info.round, before, after, audit_report, eval_report,
        pooling=getattr(merged.config, CONFIG_KEY, None),
    )  # fmt: skip
    return _write_atomically(
        out,
        lambda tmp: _fill_folder(tmp, merged, tokenizer, info, card),
        lambda tmp: sign_folder(tmp, key, extra, passphrase),
    )


# ------------------------------------------------------------------------------- reading a run


def read_run(run_dir: str | Path, round: int | None = None) -> RunInfo:
    """Load config, summary, the chosen round's adapter location and the held-out records."""
    root = Path(run_dir)
    for name in ("config.toml", "summary.json", "rounds"):
        if not (root / name).exists():
            raise PublishError(f"`{root}` is not a finished run: `{name}` is missing")
    cfg = load_config(root / "config.toml")
    try:
        summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PublishError(f"`{root / 'summary.json'}` is not JSON ({err.msg})") from None
    if round is None:  # an early-stopped run publishes its best round unless told otherwise
        round = (summary.get("early_stop") or {}).get("best_round")
    chosen = _choose_round(root / "rounds", round)
    adapter_dir = root / "rounds" / str(chosen)
    from common.core.adapters import is_saved_round

    if not is_saved_round(adapter_dir):
        raise PublishError(
            f"round {chosen} of `{root}` holds no saved round (no `adapter_config.json` or "
            "`trained_weights.json`)"
        )
    return RunInfo(root, cfg, summary, chosen, adapter_dir, read_test_records(root, cfg))


def _choose_round(rounds_dir: Path, wanted: int | None) -> int:
    available = sorted(int(p.name) for p in rounds_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not available:
        raise PublishError(f"`{rounds_dir}` holds no saved round")
    if wanted is None:
        return available[-1]
    if wanted not in available:
        raise PublishError(f"`round` {wanted} was not saved; available rounds: {available}")
    return wanted


def read_test_records(run_dir: Path, cfg: Config) -> list[Any]:
    """Held-out records: the run's ``test/`` folder, else ``evaluation.test_dir`` of its config."""
    from common.core.records import read_folder

    test_dir = run_dir / "test"
    if not test_dir.is_dir():
        if not cfg.evaluation.test_dir:
            raise PublishError(f"`{test_dir}` is missing and `evaluation.test_dir` is empty: "
                               "the evaluation gate needs held-out records")  # fmt: skip
        test_dir = Path(cfg.evaluation.test_dir)
    records = read_folder(test_dir, cfg.data.form, cfg.data.labels)
    if cfg.evaluation.max_records:
        records = records[: cfg.evaluation.max_records]
    if not records:
        raise PublishError(f"`{test_dir}` holds no test records; the evaluation gate needs some")
    return list(records)


def _read_report(path: str | Path, info: RunInfo, kind: str) -> dict[str, Any]:
    """A `fedtune audit` or `fedtune evaluate` report, checked to be of this run's round."""
    file = Path(path)
    if file.is_dir():
        file = file / "report.json"
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise PublishError(f"cannot read the {kind} report `{file}`: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise PublishError(f"the {kind} report `{file}` is not JSON ({err.msg})") from None
    model = report.get("model", report) if isinstance(report, dict) else {}
    run_id = str(info.summary.get("run_id", ""))
    if not isinstance(model, dict) or model.get("run_id") != run_id:
        raise PublishError(f"the {kind} report `{file}` is not of this run (run id "
                           f"{model.get('run_id') if isinstance(model, dict) else None!r}, "
                           f"this run {run_id!r})")  # fmt: skip
    if model.get("round") != info.round:
        raise PublishError(f"the {kind} report `{file}` is of round {model.get('round')}, and "
                           f"round {info.round} is being published: publish that round "
                           f"(`--round`) or {kind} this one")  # fmt: skip
    return report


def check_audit(report: dict[str, Any], summary: dict[str, Any]) -> None:
    """Refuse when the audit's lower bound exceeds the claim, the claim taken from the run's
    own summary (never from the report)."""
    from common.privacy.audit import claimed_epsilon

    claim = claimed_epsilon(summary.get("privacy"))
    bound = float(report.get("epsilon_lower_bound", 0.0))
    if claim is not None and bound > claim["epsilon"]:
        raise AuditError(
            f"the audit's empirical lower bound on epsilon ({bound:.3f}) exceeds the claimed "
            f"epsilon ({claim['epsilon']:.3f}, {claim['from']}): the privacy claim is false "
            "(noise not added, or accounting that undercounts). Not published; --force does "
            "not override this"
        )


# ------------------------------------------------------------------------- model and the gate


def _default_load_base(cfg: Config) -> tuple[Any, Any]:
    from common.core.models import load_base

    # The adapter goes into the full-precision base, never into quantized weights (folding a
    # LoRA delta into 4-bit weights re-rounds it and changes generations).
    loaded = load_base(cfg.model.model_copy(update={"quantization": "none"}), cfg.data.labels)
    return loaded.model, loaded.tokenizer


def run_base(info: RunInfo, load_base: LoadBaseFn | None = None) -> tuple[Any, Any]:
    """(base model, tokenizer) as the run's rounds started from: with the head's whitening map
    (`model.head_input = "whitened"`) the run wrote, which `publish` then folds."""
    model, tokenizer = (load_base or _default_load_base)(info.cfg)
    if info.cfg.model.head_input == "whitened":
        from common.core.errors import ModelError
        from common.core.headinput import WHITENING_FILE, load_whitening, set_whitening, to_bytes

        try:
            whitening = load_whitening(info.run_dir)
        except ModelError as err:
            raise PublishError(str(err)) from None
        expected = (info.summary.get("head_whitening") or {}).get("sha256")
        if expected is None:
            raise PublishError(
                f"`{info.run_dir / 'summary.json'}` has no `head_whitening`: the run's head "
                "whitening map cannot be checked, so it is not used"
            )
        if hashlib.sha256(to_bytes(whitening)).hexdigest() != expected:
            raise PublishError(
                f"`{info.run_dir / WHITENING_FILE}` is not the map the run sent its sites "
                "(its sha256 differs from `summary.json`'s `head_whitening`): not used"
            )
        set_whitening(model, whitening)
    return model, tokenizer


def _default_evaluate(model: Any, tokenizer: Any, cfg: Config, records: list[Any]) -> Metrics:
    """The run loop's own evaluation, so publish-time numbers compare with the run summary."""
    from common.core.tasks import evaluate

    return evaluate(model, tokenizer, records, cfg, cfg.evaluation.batch_size)


def merged_round(run_dir: str | Path, round: int | None = None) -> tuple[Config, Any, Any]:
    """(config, merged model, tokenizer) of a run's round (default as `publish`), for evaluation."""
    info = read_run(run_dir, round)
    model, tokenizer = run_base(info)
    return info.cfg, _merge_adapter(model, info.adapter_dir), tokenizer


def _merge_adapter(model: Any, adapter_dir: Path) -> Any:
    """Apply the saved round to ``model`` (in place): a PEFT adapter folded into the base
    weights, or the trained weights of `partial` / `full` loaded over the base's."""
    from common.core.adapters import apply_round
    from common.core.errors import ModelError

    try:
        return apply_round(model, adapter_dir)
    except ModelError as err:
        raise PublishError(str(err)) from None


def check_gate(
    before: Metrics, after: Metrics, margin: float, loss_margin: float, force: bool
) -> None:
    """Raise :class:`EvaluationGateError` if ``after`` is worse than ``before`` past a margin."""
    problems = []
    acc_b, acc_a = before.get("accuracy"), after.get("accuracy")
    if acc_b is not None and acc_a is not None and acc_a < acc_b - margin:
        problems.append(f"accuracy fell from {acc_b:.4f} to {acc_a:.4f} (margin {margin})")
    loss_b, loss_a = before.get("loss"), after.get("loss")
    if loss_a is not None and not math.isfinite(loss_a):
        problems.append(f"loss is {loss_a}")
    elif loss_b is not None and loss_a is not None and loss_a > loss_b * (1 + loss_margin):
        problems.append(f"loss rose from {loss_b:.4f} to {loss_a:.4f} (margin {loss_margin:.0%})")
    if not problems:
        return
    message = "merged model is worse than the base model on the held-out set: " + "; ".join(
        problems
    )
    if force:
        logger.warning("%s; publishing anyway (--force)", message)
        return
    raise EvaluationGateError(message + ". Nothing was written; use --force to publish anyway.")


# ---------------------------------------------------------------------------- writing the folder


def _check_out_dir(out: Path) -> None:
    if out.exists():
        raise PublishError(f"`{out}` already exists; publish into a new folder")
    if not out.parent.is_dir():
        raise PublishError(f"parent folder `{out.parent}` does not exist")


def _fill_folder(tmp: Path, merged: Any, tokenizer: Any, info: RunInfo, card: str) -> None:
    """Standard HF layout (weights, config, generation config, tokenizer) + adapter + card."""
    merged.config.use_cache = True  # training turns the KV cache off; serving needs it
    from common.core.headinput import fold

    fold(merged)  # `model.head_input`: into the head's weights, so any loader reads it as is
    merged.save_pretrained(str(tmp))
    generation = getattr(merged, "generation_config", None)  # a classifier has none
    if generation is not None and not (tmp / "generation_config.json").exists():
        generation.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    from common.core.adapters import is_adapter

    if is_adapter(info.adapter_dir):  # `partial` / `full`: the weights above are the whole model
        adapter = tmp / "adapter"
        adapter.mkdir()
        for src in sorted(info.adapter_dir.iterdir()):
            if src.is_file():
                shutil.copyfile(src, adapter / src.name)
    (tmp / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    for path in tmp.rglob("*"):  # some writers create 0600 files; a published folder is for reading
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write_atomically(
    out: Path, fill: Callable[[Path], None], sign: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """Fill and sign a hidden sibling folder, then rename it to ``out`` in one step."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        manifest = sign(tmp)  # last: the signature covers every file, manifest.json included
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a published folder is meant to be read
        if out.exists():
            raise PublishError(f"`{out}` appeared while publishing; not replacing it")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("published %s (signed)", out)
    return manifest


def _privacy_statement(summary: dict[str, Any]) -> str:
    """The run's privacy guarantee in plain words, as the run summary states it."""
    privacy = summary.get("privacy")
    if isinstance(privacy, dict) and isinstance(privacy.get("statement"), str):
        return str(privacy["statement"])
    return "No differential privacy guarantee: the run trained without differential privacy."


def _jsonable(metrics: Metrics) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool | None)}
