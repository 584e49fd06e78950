"""`fedtune simulate`: N virtual sites on one machine, through Flower's simulation runtime.

Flower's supported way to simulate is `flwr run` against a SuperLink in simulation mode, and this
drives exactly that: a private SuperLink for the run (cli/superlink.py), then `flwr run <app>
--stream` of the ServerApp (server/app.py) and ClientApp (client/app.py) that pyproject.toml
names (from a copy of just the app, see :func:`stage_app`), its log shown as it comes
(cli/flower_log.py) and kept in ``OUT/logs/``, and everything it started stopped afterwards, on
errors and on Ctrl-C too. The run config names a TOML file holding
the config, the run folder, and ``simulate-sites`` (the ServerApp writes the scenario's virtual
sites into the run folder, as under `flwr run .`). Nothing below the CLI knows all three pieces.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import FrameType
from typing import Any

from cli.flower_log import FlowerLog, plain
from cli.superlink import CONNECTION, LocalSuperLink
from common.core.config import Config, to_toml
from common.core.errors import ConfigError, FedtuneError, RoundError
from server.status import read_status

logger = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml's [tool.flwr.app]
STARTED = re.compile(r"Successfully started run (\d+)")
FAILED_PREFIX = "Simulation failed with exception: "  # how flwr-simulation words a ServerApp error
# Ray 2.55 warns on every `ray.init` that a future Ray will stop hiding GPUs from tasks that ask
# for none (FutureWarning "Tip: In future versions of Ray, ..."). Opting in early would change
# which device a site trains on (`train.device = "auto"` would see the GPUs), so this one
# warning, from that one module, is ignored in the processes the SuperLink starts.
RAY_GPU_TIP = "ignore:Tip:FutureWarning:ray._private.worker"


def simulate(
    cfg: Config, out: str | Path, resume: bool = False, monitor: tuple[str, int] | None = None
) -> dict[str, Any]:
    """Run the scenario through Flower's simulation runtime; returns the run summary.

    ``resume``: continue the run in ``out`` after its last completed round (its own config and
    site folders are reused; ``cfg`` must be that config). ``monitor``: (host, port) of the
    live view (Prometheus metrics and the status page). Progress is shown as the run goes.
    """
    out = Path(out).resolve()
    federation = federation_config(cfg)
    if not (APP_DIR / "pyproject.toml").is_file():
        raise ConfigError(
            f"`fedtune simulate` runs the Flower app in fedtune's source folder, and {APP_DIR} "
            "has no pyproject.toml: install fedtune from its checkout (`pip install -e .`)"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    warnings_env = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), RAY_GPU_TIP]))
    quiet = {"PYTHONWARNINGS": warnings_env}
    with _sigterm_unwinds(), LocalSuperLink(out / "logs", extra_env=quiet) as link:
        request = link.folder / "fedtune-config.toml"
        request.write_text(to_toml(cfg), encoding="utf-8")
        run_config = link.folder / "run-config.toml"
        run_config.write_text(_run_config(request, out, resume, monitor), encoding="utf-8")
        try:
            with Progress(out):
                run_id, shown = _run(link, run_config, federation, out / "logs" / "run.log")
        except KeyboardInterrupt:
            then = f"; `--resume {out}` continues it" if (out / "checkpoint.json").is_file() else ""
            logger.warning("interrupted: stopping the run and the local SuperLink%s", then)
            raise
        return _summary(link, out, run_id, shown)


class Progress:
    """While the run goes: one line on stderr each time its phase, round or replies change,
    read from the run folder's status.json (server/status.py): `[###.......] round 2/5 ·
    training · 1 of 3 sites replied · 42 s`. Plain text, so logs stay readable off a terminal."""

    def __init__(self, out: Path, every_s: float = 1.0) -> None:
        self.out, self.every_s = out, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._seen: tuple[Any, ...] | None = None
        self._since = time.time()

    def __enter__(self) -> Progress:
        self._since = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                state = read_status(self.out)
            except (OSError, ValueError):
                continue
            if state is None or state.get("updated", 0) < self._since:
                continue  # none yet, or the previous run's
            key = (state["phase"], state["round"], state["replied"], state["asked"])
            if key != self._seen:
                self._seen = key
                sys.stderr.write(progress_line(state) + "\n")
                sys.stderr.flush()


def progress_line(state: dict[str, Any], width: int = 10) -> str:
    """`[###.......] round 2/5 · training · 1 of 3 sites replied · 42 s` from a status."""
    rounds, r = max(1, int(state["rounds"])), int(state["round"])
    phase = str(state["phase"])
    done = r if phase in ("done", "evaluating", "aggregating") else max(0, r - 1)
    filled = round(width * min(done, rounds) / rounds)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] round {r}/{rounds}", phase]
    if state.get("asked") and phase in ("training", "preflight"):
        parts.append(f"{state['replied']} of {state['asked']} sites replied")
    parts.append(f"{state['updated'] - state['started']:.0f} s")
    return " · ".join(parts)


def federation_config(cfg: Config) -> str:
    """Flower's federation config (`flwr run --federation-config`): sites and Ray resources.

    Flower takes whole CPUs, Ray counts logical ones: a fraction per site is scaled up together
    with the machine's CPUs (0.5 per site on 2 CPUs = 1 per site on 4), so as many sites train at
    a time as Ray would run with the fraction itself.
    """
    per_site, cpus = cfg.simulation.backend_cpus_per_site, os.cpu_count() or 1
    if per_site > cpus:
        raise ConfigError(
            f"`simulation.backend_cpus_per_site` = {per_site} exceeds this machine's {cpus} CPUs"
        )
    share = Fraction(per_site).limit_denominator(100)
    return (
        f"num-supernodes={cfg.simulation.partition.num_sites} "
        f"client-resources-num-cpus={share.numerator} client-resources-num-gpus=0.0 "
        f"init-args-num-cpus={cpus * share.denominator}"
    )  # no Ray dashboard: Flower's Ray backend leaves it off unless asked


def _run_config(
    config_file: Path, out: Path, resume: bool, monitor: tuple[str, int] | None = None
) -> str:
    """The run config (the keys pyproject.toml's [tool.flwr.app.config] declares)."""
    import tomli_w

    host, port = monitor if monitor is not None else ("127.0.0.1", -1)
    return tomli_w.dumps(
        {
            "scenario": str(config_file),
            "overrides": "",
            "out": str(out),
            "simulate-sites": True,
            "resume": resume,
            "monitor-port": port,
            "monitor-host": host,
        }
    )


def stage_app(dest: Path) -> Path:
    """The Flower app as `flwr run` reads it: pyproject.toml and the packages it declares.

    `flwr run <folder>` lists every file under the folder before its .gitignore filter drops
    most (Flower 1.41, flwr/cli/utils.py `collect_files`); in a checkout that is the .venv and
    run folders too (~58,000 files: seconds idle, over 20 s on a loaded machine). A copy of what
    the app is made of (about 100 files) takes milliseconds and builds the same ServerApp and
    ClientApp.
    """
    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    includes = project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    packages = [p.rstrip("*").rstrip(".") for p in includes.get("include", [])]
    if not packages:
        raise ConfigError(f"{APP_DIR / 'pyproject.toml'} names no packages to run")
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", ".gitignore"):
        if (APP_DIR / name).is_file():
            shutil.copy2(APP_DIR / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in packages:
        if (APP_DIR / package).is_dir():
            shutil.copytree(APP_DIR / package, dest / package, ignore=skip)
    return dest


def _run(
    link: LocalSuperLink, run_config: Path, federation: str, log: Path
) -> tuple[int | None, FlowerLog]:
    """`flwr run --stream` to its end: each line to ``log``, and what the user should see."""
    app = stage_app(link.folder / "app")
    cmd = ["run", str(app), CONNECTION, "--stream", "--run-config", str(run_config)]
    cmd += ["--federation-config", federation]
    shown, run_id = FlowerLog(), None
    with log.open("w", encoding="utf-8", buffering=1) as full:
        proc = link.flwr(cmd, subprocess.PIPE, cwd=app)
        for line in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace"):
            full.write(line)
            if run_id is None and (m := STARTED.search(line)):
                run_id = int(m.group(1))
                logger.debug("run %d submitted", run_id)
            _show(shown.feed(line))
        _show(shown.finish())
        logger.debug("run %s: its log ended", run_id)
        if proc.wait() != 0 and run_id is None:
            raise RoundError(f"`flwr run` failed (exit {proc.returncode}); its output: {log}")
    return run_id, shown


def _show(lines: list[str]) -> None:
    colour = sys.stderr.isatty()
    for line in lines:
        sys.stderr.write(line if colour else plain(line) + "\n")
    sys.stderr.flush()


def _summary(
    link: LocalSuperLink, out: Path, run_id: int | None, shown: FlowerLog
) -> dict[str, Any]:
    """The summary the ServerApp wrote; else the run failed: say why in one paragraph."""
    path = out / "summary.json"
    if path.is_file():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    status, details = _status(link, run_id)
    if shown.user_error is not None:  # Flower's record of the message first, else the log's
        message = details.removeprefix(FAILED_PREFIX) if details.startswith(FAILED_PREFIX) else ""
        raise _user_error(shown.user_error, message or shown.user_message)
    cause = details or shown.failure or "no reason given"
    raise RoundError(
        f"the run ended without a summary (Flower: run {status}: {cause}); the log above has "
        f"the details, all of it is in {out / 'logs' / 'run.log'}"
    )


def _user_error(cls: type[FedtuneError], message: str) -> FedtuneError:
    """The ServerApp's own error, as it raised it (the same class and message)."""
    try:
        return cls(message)
    except TypeError:  # a subclass with another constructor: the message is what matters
        return FedtuneError(message)


def _status(link: LocalSuperLink, run_id: int | None) -> tuple[str, str]:
    """Flower's status of the run and its details (`flwr ls --run-id N --format json`)."""
    if run_id is None:
        return "unknown", ""
    proc = link.flwr(
        ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], subprocess.PIPE
    )
    text = proc.communicate(timeout=120)[0].decode("utf-8", errors="replace")
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        run = json.loads(text[text.index("{") :])["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    return "unknown", ""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (`kill`, a supervisor, a test's timeout) unwinds like Ctrl-C, so that the
    processes started for the run are stopped before this one exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
