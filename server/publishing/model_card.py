"""MODEL_CARD.md of a published model: provenance, evaluation, the privacy guarantee in words."""

from __future__ import annotations

from typing import Any

from common.core.config import Config


def render_model_card(
    cfg: Config, summary: dict[str, Any], round: int, before: dict[str, Any], after: dict[str, Any]
) -> str:
    """The whole card as Markdown."""
    sections = [
        f"# {cfg.name}: federated LoRA fine-tune\n",
        _provenance(cfg, summary, round),
        _evaluation(summary, before, after),
        _privacy(summary.get("privacy")),
        _limitations(cfg),
        _files(),
    ]
    return "\n".join(sections)


def _provenance(cfg: Config, summary: dict[str, Any], round: int) -> str:
    sites = summary.get("sites") or {}
    lines = [
        "## Provenance\n",
        f"- Base model: `{cfg.model.source}`",
        f"- Task: `{cfg.model.task}`",
        f"- LoRA: rank {cfg.lora.r}, alpha {cfg.lora.alpha}, aggregation `{cfg.lora.aggregation}`",
        f"- Rounds run: {summary.get('rounds', 'unknown')}; adapter published from round {round}",
        f"- Run id: `{summary.get('run_id', 'unknown')}`; config sha256: `{cfg.digest()}`",
        f"- Secure aggregation: {'on' if cfg.secagg.enabled else 'off'}",
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


def _limitations(cfg: Config) -> str:
    return "\n".join(
        [
            "## Limitations\n",
            f"- Fine-tuned from `{cfg.model.source}`; it inherits that model's biases, knowledge "
            "cut-off and failure modes, and may state false things fluently.",
            "- Evaluated only on the held-out records listed above; it was not tested for safety, "
            "fairness or out-of-distribution inputs. Do not use it for clinical, credit or other "
            "high-stakes decisions without review by a qualified person.",
            "- The differential-privacy guarantee (if any) covers the training process as "
            "configured; it says nothing about data given to the model at inference time.",
            f"- Inputs are truncated to {cfg.model.max_length} tokens during training.\n",
        ]
    )


def _files() -> str:
    return "\n".join(
        [
            "## Files\n",
            "- `model.safetensors`, `config.json`, `generation_config.json`, tokenizer files: the "
            "merged model, a standard Hugging Face folder (loads with `transformers`, vLLM, TGI).",
            "- `adapter/`: the LoRA adapter alone (PEFT format).",
            "- `manifest.json`: run id, config hash, evaluation and privacy statement; "
            "`model.sig`: an OpenSSF Model Signing signature (ECDSA P-256) over every file, "
            "manifest included; "
            "check with `fedtune verify` or `model_signing verify key`.\n",
        ]
    )
