"""fedtune's ServerApp: the same code under `fedtune simulate`, `flwr run .` and a SuperLink.

Run config (Flower's flat key/value map) carries either the whole resolved config as JSON
(`fedtune-config`) or a `scenario` TOML path plus overrides (what `fedtune simulate` sends); `out`
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
from common.core.errors import ConfigError
from server.run import FederatedRun
from server.status import Monitor
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
    resume = conf.get("resume") is True
    if conf.get("simulate-sites") is True and not data_root:
        # A simulation federation (`flwr run .`, `fedtune simulate`): the scenario's virtual sites
        # live in the run folder, written now or, on resume, by the run being continued.
        if not resume:
            cfg = prepare(cfg, out)
        data_root = str(out / "sites")
    logger.info("run %s: %d round(s), writing to %s", cfg.name, cfg.federation.rounds, out)
    monitor = _monitor(conf)
    try:
        run = FederatedRun(cfg, out, grid, data_root=data_root, resume=resume, monitor=monitor)
        return run.execute()
    finally:
        if monitor is not None:
            monitor.close()


def _monitor(conf: Mapping[str, Any]) -> Monitor | None:
    """The live view (Prometheus metrics and the status page) when the run config names a
    `monitor-port` (off by default; `monitor-host` 127.0.0.1 unless told otherwise)."""
    port = conf.get("monitor-port")
    if port is None or port == "" or int(port) < 0:
        return None
    host = str(conf.get("monitor-host") or "127.0.0.1")
    try:
        return Monitor(host, int(port))
    except OSError as err:
        raise ConfigError(f"`monitor-port` {port} on {host}: cannot listen ({err})") from err


def _log_in_flower_process() -> None:
    """Under Flower's runtime the ServerApp has a process of its own where nothing set up
    logging: fedtune's INFO records go to stderr, which Flower streams (`flwr run --stream`).
    A process whose root logger takes INFO already (fedtune's CLI) is left as it is."""
    if logging.getLogger().isEnabledFor(logging.INFO) or logging.getLogger("server").handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    for name in ("server", "common", "simulations"):
        package = logging.getLogger(name)
        package.setLevel(logging.INFO)
        package.addHandler(handler)
        package.propagate = False
    # Flower logs through its own console handler; the root handler opacus installs at import
    # (`logging.basicConfig` in opacus/utils/module_utils.py) printed each record, DEBUG too, again.
    logging.getLogger("flwr").propagate = False


def make_server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` (used by `fedtune simulate`) fills in Flower's run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_in_flower_process()
        merged = {**dict(context.run_config), **dict(run_config or {})}
        run_server(grid, merged)

    return server_app


app = make_server_app()
