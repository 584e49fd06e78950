"""The evaluation report as files: ``report.json`` for machines, ``report.md`` (with plots) for
people. Written atomically; the Markdown states each target and whether it was met."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if confusion := report["metrics"].get("confusion"):
        plots.append(_confusion_plot(confusion, out / "confusion.png"))
    js, md = out / "report.json", out / "report.md"
    _atomic(js, json.dumps(report, indent=2))
    _atomic(md, markdown(report, [p.name for p in plots]))
    return js, md


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    m = report["metrics"]
    skip = {"per_class", "confusion"}
    lines = [f"# Evaluation ({report['task']}, {report['records']} records)", "", "## Metrics", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in m.items() if k not in skip]
    if "per_class" in m:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [
            f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
            for c, v in m["per_class"].items()
        ]
    lines += [f"\n![confusion matrix]({p})" for p in plots]
    if g := report.get("groups"):
        lines += ["", "## Groups", "", f"| group | {g['metric']} | examples |", "|---|---|---|"]
        lines += [
            f"| {name} | {v[g['metric']]:.4f} | {v['examples']} |"
            for name, v in g["by_group"].items()
        ]
        lines += ["", f"Largest gap: {g['gap']:.4f} ({g['best']} vs {g['worst']}); target at "
                  f"most {g['threshold']}: {'met' if g['met'] else 'NOT met'}."]  # fmt: skip
    if r := report.get("robustness"):
        lines += ["", "## Robustness", "", f"| perturbation | rate | seed | {r['metric']} | drop |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {name} | {v['rate']} | {v['seed']} | {v[r['metric']]:.4f} | {v['drop']:.4f} |"
            for name, v in r["perturbations"].items()
        ]
        lines += ["", f"Worst ratio to the clean {r['metric']}: {r['worst_ratio']:.3f}; target at "
                  f"least {r['target']}: {'met' if r['met'] else 'NOT met'}."]  # fmt: skip
    if lat := report.get("latency"):
        lines += ["", "## Latency", "", f"p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms "
                  f"over {lat['requests']} requests on this machine; target p95 at most "
                  f"{lat['target_ms']:.0f} ms: {'met' if lat['met'] else 'NOT met'}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _confusion_plot(confusion: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = confusion["labels"], confusion["matrix"]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
