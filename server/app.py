"""fedtune's ServerApp: the same code under `fedtune simulate`, `flwr run .` and a SuperLink.

Run config (Flower's flat key/value map) carries either the whole resolved config as JSON
(`fedtune-config`, what `fedtune simulate` sends) or a `scenario` TOML path plus overrides; `out`
names the run folder and `data-root` (simulation only) where virtual sites find their folders.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.core.config import from_run_config
from server.run import FederatedRun
from simulations.run import prepare

logger = logging.getLogger(__name__)


APP_DIR = Path(__file__).resolve().parents[1]


def _resolve(path: str) -> str:
    """Paths in run config may be relative to the app folder (Flower copies apps elsewhere)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    return str(APP_DIR / p)


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    conf = dict(run_config)
    if conf.get("scenario"):
        conf["scenario"] = _resolve(str(conf["scenario"]))
    cfg = from_run_config(conf)
    out = Path(str(conf.get("out", "runs/latest"))).expanduser().resolve()
    data_root = str(conf.get("data-root", ""))
    if conf.get("simulate-sites") is True and not data_root and conf.get("resume") is not True:
        # `flwr run .` on a simulation federation: write the scenario's virtual sites first.
        cfg = prepare(cfg, out)
        data_root = str(out / "sites")
    logger.info("run %s: %d round(s), writing to %s", cfg.name, cfg.federation.rounds, out)
    resume = conf.get("resume") is True
    return FederatedRun(cfg, out, grid, data_root=data_root, resume=resume).execute()


def make_server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` (used by `fedtune simulate`) fills in Flower's run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        merged = {**dict(context.run_config), **dict(run_config or {})}
        run_server(grid, merged)

    return server_app


app = make_server_app()
