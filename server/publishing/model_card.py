"""MODEL_CARD.md of a published model: provenance, evaluation, the privacy guarantee in words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.core.config import Config


def render_model_card(
    cfg: Config,
    summary: dict[str, Any],
    round: int,
    before: dict[str, Any],
    after: dict[str, Any],
    audit: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    pooling: str | None = None,
) -> str:
    """The whole card as Markdown. ``pooling``: the head pooling the published model's config
    records (a base folder fedtune published may bring it whatever `model.head_pooling` says)."""
    sections = [
        f"# {cfg.name}: federated {METHOD_TITLE[cfg.lora.method]}\n",
        _provenance(cfg, summary, round, pooling),
        _evaluation(summary, before, after),
        _evaluation_report(evaluation),
        _privacy(summary.get("privacy")),
        _audit(audit),
        _limitations(cfg, evaluation is not None),
        _files(cfg.lora.method),
    ]
    return "\n".join(s for s in sections if s)


METHOD_TITLE = {
    "lora": "LoRA fine-tune",
    "dora": "DoRA fine-tune",
    "ia3": "IA3 fine-tune",
    "prompt": "prompt tuning",
    "partial": "partial fine-tune",
    "head": "classification head fine-tune (linear probe)",
    "full": "full fine-tune",
}


def _method_line(cfg: Config) -> str:
    lora = cfg.lora
    if lora.method in ("lora", "dora"):
        return (f"- Method: `{lora.method}`, rank {lora.r}, alpha {lora.alpha}, "
                f"aggregation `{lora.aggregation}`")  # fmt: skip
    if lora.method == "partial":
        what = (f"layers {lora.layers}" if lora.layers
                else f"the top layers holding {lora.fraction} of the weights")  # fmt: skip
        return f"- Method: `partial` ({what}, final norm and head trained; the rest frozen)"
    if lora.method == "head":
        return "- Method: `head` (the classification head trained; everything else frozen)"
    return f"- Method: `{lora.method}`"


def _head_input_line(cfg: Config, summary: dict[str, Any], pooling: str | None) -> list[str]:
    lines = []
    if "mean" in (cfg.model.head_pooling, pooling):
        lines.append(
            "- Head pooling: the mean of the last hidden states over the record's tokens "
            "(attention mask), not the model's pooler or last token (config.json: "
            "`fedtune_head_pooling`; an encoder's folder has no pooler weights). fedtune's "
            "loaders apply it; elsewhere, pool so before the head (`classifier` or `score`), "
            "as sentence-transformers does"
        )
    if cfg.model.head_input == "as-is":
        return lines
    line = "- Head input: without the label names' mean feature (folded into the head)"
    if cfg.model.head_input == "whitened":
        info = summary.get("head_whitening") or {}
        reference = Path(str(info.get("reference", "unknown"))).name  # not the coordinator's path
        line += (
            ", then whitened by a map from the coordinator's public reference texts "
            f"(`{reference}`, {info.get('reference_texts', '?')} texts, sha256 "
            f"`{info.get('reference_sha256', 'unknown')}`; map sha256 "
            f"`{info.get('sha256', 'unknown')}`); no site's records were used for it"
        )
    return [*lines, line]


def _provenance(cfg: Config, summary: dict[str, Any], round: int, pooling: str | None) -> str:
    sites = summary.get("sites") or {}
    lines = [
        "## Provenance\n",
        f"- Base model: `{cfg.model.source}`"
        + (
            f", its lowest {cfg.model.keep_layers} layer{'s' if cfg.model.keep_layers > 1 else ''}"
            " (`model.keep_layers`; the folder holds no other)"
            if cfg.model.keep_layers
            else ""
        ),
        f"- Task: `{cfg.model.task}`",
        _method_line(cfg),
        f"- Rounds run: {summary.get('rounds', 'unknown')}; published from round {round}",
        f"- Run id: `{summary.get('run_id', 'unknown')}`; config sha256: `{cfg.digest()}`",
        f"- Secure aggregation: {'on' if cfg.secagg.enabled else 'off'}",
        *_head_input_line(cfg, summary, pooling),
        f"- Sites: {len(sites)}",
        "",
        "| site | training records |",
        "|---|---|",
    ]
    for name in sorted(sites):
        info = sites[name]
        count = info.get("records", "not disclosed") if isinstance(info, dict) else info
        lines.append(f"| {name} | {count} |")
    lines.append(
        "\nOnly record counts are given, and none under differential privacy (a count is not "
        "covered by the guarantee); no record ever left its site.\n"
    )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value if value is not None else "-")


def _g(value: Any, digits: int) -> str:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return f"{value:.{digits}g}" if is_number else str(value)


def _evaluation(summary: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> str:
    base, final = summary.get("base") or {}, summary.get("final") or {}
    lines = [
        "## Evaluation\n",
        "| measured | model | accuracy | loss |",
        "|---|---|---|---|",
        f"| at publish, held-out set | base | {_fmt(before.get('accuracy'))} | "
        f"{_fmt(before.get('loss'))} |",
        f"| at publish, held-out set | published (merged) | {_fmt(after.get('accuracy'))} | "
        f"{_fmt(after.get('loss'))} |",
        f"| during training (run summary) | base | {_fmt(base.get('accuracy'))} | "
        f"{_fmt(base.get('loss'))} |",
        f"| during training (run summary) | final | {_fmt(final.get('accuracy'))} | "
        f"{_fmt(final.get('loss'))} |",
        "",
    ]
    return "\n".join(lines)


def _privacy(privacy: Any) -> str:
    """The run's plain statement (common/privacy/report.py), never raw keys."""
    lines = ["## Privacy guarantee\n"]
    statement = privacy.get("statement") if isinstance(privacy, dict) else None
    if not privacy or not statement:
        lines.append(
            "**No differential privacy guarantee.** This run was trained without differential "
            "privacy: the model may memorise and reveal training records. Treat it as being as "
            "sensitive as the data it was trained on.\n"
        )
        return "\n".join(lines)
    head, *rest = str(statement).splitlines()
    lines.append(f"**{head}**\n")
    for line in rest:
        lines.append(f"  {line.strip()}" if line.startswith("    ") else line)
    return "\n".join(lines) + "\n"


def _evaluation_report(report: dict[str, Any] | None) -> str:
    """The `fedtune evaluate` report: metrics, per-group gap, robustness, latency, targets."""
    if not report:
        return ""
    m = report.get("metrics", {})
    names = (
        ("accuracy", "macro_f1", "loss")
        if report.get("task") == "classification"
        else ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "perplexity")
    )
    lines = [f"## Evaluation report ({report.get('task')}, {report.get('records')} records)\n"]
    lines += [f"- {k}: {_fmt(m[k])}" for k in names if k in m]
    targets = report.get("targets", {})
    rows = []
    if g := report.get("groups"):
        measured = f"{g['gap']:.4f} ({g['metric']}; lowest: {g['worst']})"
        rows.append(("largest gap between groups", measured, f"<= {g['threshold']}", g["met"]))
    if r := report.get("robustness"):
        measured = f"{r['worst_ratio']:.3f} (worst of {', '.join(r['perturbations'])})"
        rows.append(("perturbed / clean", measured, f">= {r['target']}", r["met"]))
    if lat := report.get("latency"):
        measured = f"{lat['p95_ms']:.1f} ms (p50 {lat['p50_ms']:.1f} ms)"
        rows.append(
            ("p95 latency per request", measured, f"<= {lat['target_ms']:.0f} ms", lat["met"])
        )
    if rows:
        lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {'yes' if d else '**no**'} |" for a, b, c, d in rows]
    unmet = [k for k, v in targets.items() if not v]
    lines.append("\n" + (f"**Targets not met: {', '.join(unmet)}.**" if unmet
                         else "All the targets measured were met.") + "\n")  # fmt: skip
    return "\n".join(lines)


def _audit(report: dict[str, Any] | None) -> str:
    """The empirical privacy audit (`fedtune audit`), beside the claim above."""
    if not report:
        return ""
    claim = report.get("claimed")
    claimed = f"{claim['epsilon']:.3f} ({claim['from']})" if claim else "none"
    lines = [
        "## Empirical privacy audit\n",
        f"- Lower bound on epsilon from attacks: {report['epsilon_lower_bound']:.3f} (95% "
        f"confidence, one-run audit with {next(iter(report['one_run'].values()))['canaries']} "
        f"canaries); claimed: {claimed}",
        f"- Membership inference AUC, strongest attack: {report['mia_auc']:.3f} (0.5 = guessing)",
        f"- Unit: {report.get('unit')}",
        "\nThe bound is what these attacks could prove, not the true epsilon: it does not "
        "certify the claim, it can only refute it (and publishing is refused when it does).\n",
    ]
    return "\n".join(lines)


def _limitations(cfg: Config, evaluated: bool = False) -> str:
    scope = (
        "- Evaluated on the records and with the targets of the evaluation report above; "
        "conditions outside them (other populations, other input styles) are untested."
        if evaluated
        else "- Evaluated only on the held-out records listed above; it was not tested for "
        "safety, fairness or out-of-distribution inputs."
    )
    return "\n".join(
        [
            "## Limitations\n",
            f"- Fine-tuned from `{cfg.model.source}`; it inherits that model's biases, knowledge "
            "cut-off and failure modes, and may state false things fluently.",
            scope + " Do not use it for clinical, credit or other "
            "high-stakes decisions without review by a qualified person.",
            "- The differential-privacy guarantee (if any) covers the training process as "
            "configured; it says nothing about data given to the model at inference time.",
            f"- Inputs are truncated to {cfg.model.max_length} tokens during training.\n",
        ]
    )


def _files(method: str) -> str:
    from common.core.adapters import WEIGHT_METHODS

    adapter = method not in WEIGHT_METHODS
    return "\n".join(
        [
            "## Files\n",
            "- `model.safetensors`, `config.json`, `generation_config.json`, tokenizer files: the "
            "merged model, a standard Hugging Face folder (loads with `transformers`, vLLM, TGI).",
            *(["- `adapter/`: the adapter alone (PEFT format)."] if adapter else []),
            "- `manifest.json`: run id, config hash, evaluation and privacy statement; "
            "`model.sig`: an OpenSSF Model Signing signature (ECDSA P-256) over every file, "
            "manifest included; "
            "check with `fedtune verify` or `model_signing verify key`.\n",
        ]
    )
