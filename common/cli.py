"""The `fedtune` command line. Each subcommand is a thin typed function over a library call.

User errors (FedtuneError) print one paragraph and exit with status 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from common import __version__
from common.errors import FedtuneError

logger = logging.getLogger(__name__)
console = Console(stderr=True)
out_console = Console()
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated LoRA fine-tuning.")
T = TypeVar("T")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Scenario or config TOML file.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a field: `section.field=value`.")
]


def setup_logging(verbose: bool = False) -> None:
    """Handlers live here only: library modules just get their logger."""
    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    for noisy in ("flwr", "ray", "urllib3", "filelock", "httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_user(fn: Callable[[], T]) -> T:
    """Run ``fn``; a FedtuneError becomes a one-paragraph message and exit status 2."""
    try:
        return fn()
    except FedtuneError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None
    except RuntimeError as err:  # Flower wraps ServerApp failures; show the fedtune cause
        cause = err.__cause__
        if isinstance(cause, FedtuneError):
            console.print(f"[bold red]error:[/] {cause}", highlight=False)
            raise typer.Exit(2) from None
        raise


@app.callback()
def main_callback(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    setup_logging(verbose)


@app.command()
def version() -> None:
    """Print fedtune's version."""
    out_console.print(f"fedtune {__version__}")


@app.command()
def simulate(
    config: ConfigOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path(
        "runs/latest"
    ),
    set_: SetOpt = None,
) -> None:
    """Run a scenario: N virtual sites on this machine through Flower's simulation engine."""
    from common.config import load_config
    from simulations.run import simulate as run_simulation

    def go() -> dict[str, Any]:
        cfg = load_config(config, set_ or [])
        console.print(
            f"[bold]fedtune simulate[/] {cfg.name}: {cfg.simulation.partition.num_sites} sites, "
            f"{cfg.federation.rounds} rounds, model {cfg.model.source} -> {out}"
        )
        return run_simulation(cfg, out)

    summary = run_user(go)
    out_console.print(summary_table(summary))
    out_console.print(f"Run folder: {out}")


def summary_table(summary: dict[str, Any]) -> Table:
    """Base vs federated metrics, then train loss and bytes per round."""
    table = Table(title=f"fedtune run `{summary['name']}` ({summary['wall_time_s']:.0f} s)")
    table.add_column("")
    table.add_column("base model", justify="right")
    table.add_column("federated model", justify="right")
    for key in sorted(set(summary["base"]) | set(summary["final"])):
        if key == "examples":
            continue
        base, final = summary["base"].get(key), summary["final"].get(key)
        table.add_row(f"test {key}", _num(base), _num(final))
    rounds = Table(title="per round")
    for col in ("round", "train loss", "bytes up", "bytes down"):
        rounds.add_column(col, justify="right")
    zipped = zip(summary["train_loss"], summary["bytes_up"], summary["bytes_down"], strict=True)
    for i, (loss, up, down) in enumerate(zipped, start=1):
        rounds.add_row(str(i), f"{loss:.4f}", _bytes(up), _bytes(down))
    grid = Table.grid(padding=1)
    grid.add_row(table)
    grid.add_row(rounds)
    return grid


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main() -> None:
    app(prog_name="fedtune")


if __name__ == "__main__":
    main()
