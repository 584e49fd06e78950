"""`fedtune simulate`: N virtual sites on one machine, through Flower's simulation engine.

The CLI layer composes the pieces: the scenario's virtual sites (simulations/), the ServerApp
(server/app.py) and the ClientApp (client/app.py). Nothing below the CLI knows all three.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from common.core.config import Config
from common.core.errors import ConfigError, RoundError
from simulations.run import prepare

logger = logging.getLogger(__name__)


def simulate(cfg: Config, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run the scenario through Flower's simulation engine; returns the run summary.

    ``resume``: continue the run in ``out`` after its last completed round (its own config and
    site folders are reused; ``cfg`` must be that config).
    """
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        cfg = prepare(cfg, out)
    (out / "summary.json").unlink(missing_ok=True)
    run_config = {
        "fedtune-config": json.dumps(cfg.model_dump(mode="json")),
        "out": str(out),
        "data-root": str(out / "sites"),
        "resume": resume,
    }
    sites = cfg.simulation.partition.num_sites
    cpus = os.cpu_count() or 1
    if cfg.simulation.backend_cpus_per_site > cpus:
        raise ConfigError(
            f"`simulation.backend_cpus_per_site` = {cfg.simulation.backend_cpus_per_site} "
            f"exceeds this machine's {cpus} CPUs"
        )
    backend = {
        "client_resources": {"num_cpus": cfg.simulation.backend_cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }
    run_simulation(
        server_app=make_server_app(run_config),
        client_app=client_app,
        num_supernodes=sites,
        backend_config=backend,  # type: ignore[arg-type]
    )
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise RoundError(f"the simulation ended without a summary; see the log above ({out})")
    return dict(json.loads(summary_path.read_text(encoding="utf-8")))
