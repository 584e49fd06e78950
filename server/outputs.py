"""The run folder: resolved config, metrics.jsonl, rounds/<n>/ adapters, summary.json, plots."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from common.core.adapters import save_round
from common.core.config import Config, to_toml

logger = logging.getLogger(__name__)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunWriter:
    def __init__(
        self, out: Path, cfg: Config, keep_rows: list[dict[str, Any]] | None = None
    ) -> None:
        """A fresh run folder, or (``keep_rows``) one being resumed: its metrics are rewritten to
        exactly the checkpointed rounds, so no round appears twice."""
        self.out, self.cfg = out, cfg
        out.mkdir(parents=True, exist_ok=True)
        (out / "rounds").mkdir(exist_ok=True)
        write_atomic(out / "config.toml", to_toml(cfg))
        self.metrics_path = out / "metrics.jsonl"
        rows = "".join(json.dumps(r) + "\n" for r in keep_rows or [])
        write_atomic(self.metrics_path, rows)

    def round_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def adapter(self, model: nn.Module, round_idx: int, keys: list[str]) -> Path:
        """The round's trained state (PEFT's adapter format, or the trained weights of
        `partial` / `full`: :func:`common.core.adapters.save_round`), written then renamed."""
        final = self.out / "rounds" / str(round_idx)
        tmp = self.out / "rounds" / f".{round_idx}.tmp"
        # Left by a crash: a half-written folder, or a round written but never checkpointed.
        for stale in (tmp, final):
            if stale.exists():
                shutil.rmtree(stale)
        save_round(model, tmp, keys, self.cfg.lora.method)
        os.replace(tmp, final)
        return final

    def summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=2))

    def plots(self, rows: list[dict[str, Any]]) -> None:
        """Loss and each eval metric per round, as PNGs under plots/."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plots = self.out / "plots"
        plots.mkdir(exist_ok=True)
        series = {"train_loss": "train loss"}
        series.update({k: k.replace("_", " ") for k in rows[0] if k.startswith("eval_")})
        for key, title in series.items():
            points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if not points:
                continue
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
            ax.set_xlabel("round")
            ax.set_ylabel(title)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(plots / f"{key}.png", dpi=100)
            plt.close(fig)

    def site_plot(self, rows: list[dict[str, Any]], final: dict[str, Any] | None) -> None:
        """Each site's figure on its own held-out split, round by round (plots/sites.png): the
        global model each round received (that of the round before), then the final one."""
        if final is None and not any("site_eval" in r for r in rows):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metric = "accuracy" if self.cfg.data.labels else "loss"
        series: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            for site, figures in row.get("site_eval", {}).get("sites", {}).items():
                if metric in figures:
                    point = (row["site_eval"]["of_round"], figures[metric])
                    series.setdefault(site, []).append(point)
        if final is not None:
            for site, figures in final.get("sites", {}).items():
                if metric in figures:
                    series.setdefault(site, []).append((final["round"], figures[metric]))
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for site, points in sorted(series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site)
        ax.set_xlabel("global model of round (0 = base)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} on each site's held-out split")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        (self.out / "plots").mkdir(exist_ok=True)
        fig.savefig(self.out / "plots" / "sites.png", dpi=100)
        plt.close(fig)


def dropouts(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per site, the rounds it was missing from and why: failed, offline, or dropped out of secure
    aggregation. A site that declined (its privacy budget) chose to: that is not a dropout."""
    out: dict[str, dict[str, Any]] = {}

    def note(site: str, r: int, why: str) -> None:
        entry = out.setdefault(site, {"rounds": [], "reasons": {}})
        if r not in entry["rounds"]:
            entry["rounds"].append(r)
        entry["reasons"][str(r)] = why

    for row in rows:
        r = int(row["round"])
        for site in row.get("sites_offline", []):
            note(site, r, "offline")
        for site, why in row.get("sites_failed", {}).items():
            note(site, r, str(why))
        for site, stage in row.get("secagg_dropped", {}).items():
            note(site, r, f"dropped out of secure aggregation at {stage}")
    return out
