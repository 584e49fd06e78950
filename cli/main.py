"""The `fedtune` command line. Each subcommand is a thin typed function over a library call.

User errors (FedtuneError) print one paragraph and exit with status 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from common import __version__
from common.core.errors import FedtuneError

logger = logging.getLogger(__name__)
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated LoRA fine-tuning.")
T = TypeVar("T")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Scenario or config TOML file.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a field: `section.field=value`.")
]


def setup_logging(verbose: bool = False) -> None:
    """Handlers live here only: library modules just get their logger."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    else:  # a log file or a pipe: one line per record, never wrapped at 80 columns
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    if not verbose:
        # Flower resets its own logger's level on import; keep its debug chatter off our console.
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or not r.name.startswith("flwr"))
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    for noisy in ("ray", "urllib3", "filelock", "httpx", "transformers", "peft", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Scenario or config TOML file.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path(
        "runs/latest"
    ),
    set_: SetOpt = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue this run folder after its last round.")
    ] = None,
    monitor_port: Annotated[
        int | None,
        typer.Option("--monitor-port", help="Serve the live view (/metrics, status page) here."),
    ] = None,
    monitor_host: Annotated[
        str, typer.Option("--monitor-host", help="Where the live view listens.")
    ] = "127.0.0.1",
) -> None:
    """Run a scenario: N virtual sites on this machine through Flower's simulation engine."""
    from cli.simulate import simulate as run_simulation
    from common.core.config import load_config

    if (config is None) == (resume is None):
        console.print("[bold red]error:[/] give `--config SCENARIO` or `--resume RUN_DIR`")
        raise typer.Exit(2)
    if resume is not None:
        config, out = resume / "config.toml", resume

    def go() -> dict[str, Any]:
        cfg = load_config(config, set_ or [])
        console.print(
            f"[bold]fedtune simulate[/] {cfg.name}: {cfg.simulation.partition.num_sites} sites, "
            f"{cfg.federation.rounds} rounds, model {cfg.model.source} -> {out}"
        )
        monitor = (monitor_host, monitor_port) if monitor_port is not None else None
        return run_simulation(cfg, out, resume=resume is not None, monitor=monitor)

    summary = run_user(go)
    out_console.print(summary_table(summary))
    out_console.print(f"Run folder: {out}")


keys_app = typer.Typer(no_args_is_help=True, help="Signing keys of the coordinator.")
app.add_typer(keys_app, name="keys")
PASSPHRASE_ENV = "FEDTUNE_KEY_PASSPHRASE"


def _passphrase(ask: bool, confirm: bool = False) -> str | None:
    """From the environment (never the command line, which `ps` shows), or asked for."""
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV]
    if ask:
        return str(typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm))
    return None


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the key pair.")],
    passphrase: Annotated[
        bool,
        typer.Option("--passphrase", help=f"Encrypt the private key (or set {PASSPHRASE_ENV})."),
    ] = False,
) -> None:
    """Create an EC P-256 signing key pair (OpenSSF model signing; private key mode 0600)."""
    from common.identity.signing import generate_keys

    private, public = run_user(lambda: generate_keys(out, _passphrase(passphrase, confirm=True)))
    out_console.print(f"private key: {private}\npublic key:  {public}")


@app.command()
def publish(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Model folder to write (must not exist).")
    ],
    signing_key: Annotated[Path, typer.Option("--signing-key", help="EC P-256 private key (PEM).")],
    round_: Annotated[
        int | None,
        typer.Option(
            "--round",
            help="Round to publish; default the best (`federation.early_stop`), else the last.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Publish even if worse than the base model.")
    ] = False,
    passphrase: Annotated[
        bool, typer.Option("--passphrase", help="Ask for the key's passphrase.")
    ] = False,
    audit: Annotated[
        Path | None,
        typer.Option("--audit", help="A `fedtune audit` report: into the card; gates the claim."),
    ] = None,
    evaluation: Annotated[
        Path | None,
        typer.Option(
            "--evaluation", help="A `fedtune evaluate` report of this run: into the card."
        ),
    ] = None,
) -> None:
    """Merge the run's adapter into the base model; write a signed Hugging Face folder."""
    from server.publishing.publish import publish as do_publish

    key_pass = _passphrase(passphrase)
    manifest = run_user(
        lambda: do_publish(
            run_dir, out, signing_key, round_, force, key_pass, audit=audit, evaluation=evaluation
        )
    )
    out_console.print(f"published round {manifest.get('round')} to {out} (signed: {out}/model.sig)")


@app.command()
def verify(
    model_dir: Annotated[Path, typer.Argument(help="A published model folder.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The coordinator's public key.")],
) -> None:
    """Check model.sig (OpenSSF model signing) and every file's digest; name what differs."""
    from common.identity.signing import verify_folder

    verified = run_user(lambda: verify_folder(model_dir, public_key))
    m = verified.manifest
    out_console.print(
        f"OK: signature and {len(verified.files)} file digests match (run {m.get('run_id')}, "
        f"round {m.get('round')}, config {m.get('config_hash')})"
    )


@app.command()
def evaluate(
    source: Annotated[Path, typer.Argument(help="A run folder, or a published model folder.")],
    data: Annotated[Path, typer.Option("--data", help="A folder of records to evaluate on.")],
    out: Annotated[Path, typer.Option("--out", help="Where report.json and report.md go.")] = Path(
        "evaluation"
    ),
    group_by: Annotated[
        str | None,
        typer.Option("--group-by", help="A record field: metrics per value and the largest gap."),
    ] = None,
    round_: Annotated[
        int | None, typer.Option("--round", help="A run's round; default as `publish`.")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="Verifies a published folder first.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A published folder's run config (its hash is checked)."),
    ] = None,
    max_gap: Annotated[
        float, typer.Option("--max-gap", help="Largest gap allowed between groups.")
    ] = 0.05,
    latency_requests: Annotated[
        int, typer.Option("--latency-requests", help="Requests timed one by one; 0: none.")
    ] = 20,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Generation length.")
    ] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the perturbations.")] = 0,
) -> None:
    """Evaluate a model on a folder of records: task metrics, per-group gaps, robustness to
    perturbed inputs and latency, written as report.json and report.md."""
    from common.evaluation import report as report_files
    from common.evaluation.run import evaluate_model, read_with_groups

    def go() -> dict[str, Any]:
        cfg, model, tok, identity = _model_to_evaluate(source, round_, public_key, config)
        records, groups = read_with_groups(data, cfg, group_by)
        logger.info("evaluating on %d records from %s", len(records), data)
        report = evaluate_model(
            model, tok, cfg, records, groups, max_gap=max_gap, seed=seed,
            latency_requests=latency_requests, max_new_tokens=max_new_tokens,
        )  # fmt: skip
        return {"model": identity, "data": str(data), **report}

    result = run_user(go)
    js, md = run_user(lambda: report_files.write(result, out))
    m = result["metrics"]
    main = "accuracy" if result["task"] == "classification" else "rougeL"
    targets = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets"].items())
    out_console.print(
        f"{main} {m[main]:.4f} on {result['records']} records; targets: {targets or 'none'}; "
        f"report: {md} ({js.name})"
    )


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="Run folder to write (or one already audited).")],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Scenario to train with canaries; omit to re-score."),
    ] = None,
    set_: SetOpt = None,
    canaries: Annotated[
        int | None, typer.Option("--canaries", help="Canary records (about half trained on).")
    ] = None,
    round_: Annotated[
        int | None, typer.Option("--round", help="Round to attack; default as `publish`.")
    ] = None,
) -> None:
    """Empirical privacy audit: train the scenario with canaries, attack the model (membership
    inference, exposure), and set a lower bound on epsilon beside the run's claim."""
    from cli import audit as auditing
    from cli.simulate import simulate as run_simulation
    from common.core.config import load_config
    from common.core.errors import ConfigError

    def go() -> dict[str, Any]:
        if config is not None:
            cfg = auditing.audit_config(load_config(config, set_ or []), canaries)
            console.print(
                f"[bold]fedtune audit[/] {cfg.name}: {cfg.simulation.audit.canaries} canaries, "
                f"{cfg.simulation.partition.num_sites} sites, {cfg.federation.rounds} rounds "
                f"-> {run_dir}"
            )
            run_simulation(cfg, run_dir)
        elif set_ or canaries is not None:
            raise ConfigError("`--set` and `--canaries` need `--config` (they change training)")
        return auditing.analyze(run_dir, round_)

    report = run_user(go)
    js, md = auditing.write_report(report, run_dir / "audit")
    claim = report["claimed"]
    claimed = f"{claim['epsilon']:.3f}" if claim else "none"
    verdict = "consistent" if report["consistent"] else "VIOLATED (the claim is false)"
    out_console.print(
        f"epsilon lower bound {report['epsilon_lower_bound']:.3f} (claimed {claimed}): "
        f"{verdict}; membership AUC up to {report['mia_auc']:.3f}; report: {md} ({js.name})"
    )
    if not report["consistent"]:
        raise typer.Exit(1)


def _model_to_evaluate(
    source: Path, round_: int | None, public_key: Path | None, config: Path | None
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(config, model, tokenizer, identity): a run's round merged into its base, or a verified
    published folder with the run config it was published from; identity names the run id and
    round (what `publish --evaluation` checks)."""
    from common.core.config import load_config
    from common.core.errors import ModelError

    if (source / "manifest.json").is_file():
        if public_key is None or config is None:
            raise ModelError(
                f"`{source}` is a published folder: give `--public-key` (to verify it) and "
                "`--config` (the config.toml of the run it was published from)"
            )
        from common.identity.signing import verify_folder

        manifest = verify_folder(source, public_key).manifest
        cfg = load_config(config)
        if manifest.get("config_hash") != cfg.digest():
            raise ModelError(f"`--config` {config} is not the config `{source}` was published from")
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        cls = (
            AutoModelForSequenceClassification
            if cfg.model.task == "seq-cls"
            else AutoModelForCausalLM
        )
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        identity = {"run_id": manifest.get("run_id"), "round": manifest.get("round"),
                    "published": str(source)}  # fmt: skip
        model = cls.from_pretrained(str(source), local_files_only=True)
        if cfg.model.task == "seq-cls":
            from common.core.pooling import install_saved

            install_saved(model)  # `model.head_pooling`: as the folder's config.json records
        return cfg, model, tok, identity
    from server.publishing.publish import merged_round, read_run

    info = read_run(source, round_)
    cfg, model, tok = merged_round(source, info.round)
    return cfg, model, tok, {"run_id": str(info.summary.get("run_id", "")), "round": info.round}


@app.command()
def serve(
    model_dir: Annotated[
        Path | None, typer.Argument(help="A published model folder (or use --adapter).")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="The coordinator's public key.")
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="NAME=PATH: serve this adapter (published folder, run folder or round folder) "
            "unmerged over --base as model NAME (repeat).",
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base for --adapter: a model source or a run folder."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="FEDTUNE_API_KEY", help="Require this bearer key."),
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="Model id (default: the folder's name).")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads; 0 = default.")] = 0,
    max_batch: Annotated[int, typer.Option(help="Requests batched into one step.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before a 429.")] = 64,
    max_tokens: Annotated[
        int | None, typer.Option(help="Most tokens one request may ask for.")
    ] = None,
) -> None:
    """Verify, load and serve an OpenAI-compatible API (FastAPI: /v1/models, completions, chat,
    /metrics, /openapi.json), batching concurrent requests."""
    from server.serving.engine import EngineLimits
    from server.serving.serve import ServeOptions, main_serve

    def go() -> None:
        limits = EngineLimits(max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens)
        options = ServeOptions(host, port, api_key, threads, limits)
        main_serve(model_dir, public_key, options, model_id, adapter, base)

    run_user(go)


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="A published model folder.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The coordinator's public key.")],
    gguf: Annotated[
        bool, typer.Option("--gguf", help="Write GGUF (llama.cpp) and an Ollama Modelfile.")
    ] = False,
    quant: Annotated[str, typer.Option("--quant", help="q8_0 or q4_k_m.")] = "q8_0",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder to write (default MODEL-gguf).")
    ] = None,
) -> None:
    """Verify a published folder, then export it for llama.cpp and Ollama (`--gguf`)."""
    from server.publishing.export import export_gguf

    if not gguf:
        console.print("[bold red]error:[/] choose an export format: `--gguf`")
        raise typer.Exit(2)
    target = out or model_dir.with_name(f"{model_dir.name}-gguf")
    done = run_user(lambda: export_gguf(model_dir, target, public_key, quant))
    out_console.print(f"wrote {done.gguf}\nwrote {done.modelfile}\n"
                      f"ollama create {model_dir.name} -f {done.modelfile}")  # fmt: skip


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (during or after the run).")],
) -> None:
    """Where a run is: its phase, rounds so far with a bar, sites, the last round's metrics."""
    from cli.simulate import progress_line
    from server.status import read_rows, read_status

    def show() -> None:
        state = read_status(run_dir)
        if state is None:
            from common.core.errors import ConfigError

            raise ConfigError(
                f"`{run_dir / 'status.json'}` does not exist: is `{run_dir}` a run folder "
                "(of this version of fedtune)?"
            )
        out_console.print(f"run {state['run']}: {progress_line(state, width=20)}", markup=False)
        if state.get("error"):
            out_console.print(f"  failed: {state['error']}", highlight=False)
        sites = state.get("sites") or {}
        if sites:
            out_console.print(
                "  sites: " + ", ".join(f"{k} {v}" for k, v in sites.items()), highlight=False
            )
        for row in read_rows(run_dir):
            shown = [f"round {row['round']}"]
            for key in ("eval_loss", "eval_accuracy", "institution_epsilon", "seconds"):
                if isinstance(row.get(key), int | float):
                    shown.append(f"{key} {row[key]:.4g}")
            if row.get("record_epsilon"):
                shown.append(f"record_epsilon max {max(row['record_epsilon'].values()):.4g}")
            out_console.print("  " + ", ".join(shown), highlight=False)

    run_user(show)


@app.command("privacy-report")
def privacy_report(
    run_dir: Annotated[Path | None, typer.Argument(help="A run folder (after a run).")] = None,
    plan: Annotated[
        Path | None, typer.Option("--plan", help="A config: what it will spend.")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """State the run's privacy guarantee in plain words, or what a config plans to spend."""
    from common.privacy.report import clip_outlook, noise_outlook, report_text

    if (run_dir is None) == (plan is None):
        console.print("[bold red]error:[/] give a run folder or `--plan CONFIG` (one of them)")
        raise typer.Exit(2)
    if plan is not None:
        cfg, counts, summary, checks, trained, norms = run_user(lambda: _planned(plan, set_ or []))
        out_console.print(report_text(summary))
        if outlook := noise_outlook(cfg, counts, trained):
            out_console.print(outlook)
        if clipping := clip_outlook(cfg, norms):
            out_console.print(clipping)
        out_console.print("Each site's own policy (its ledger as it is now):", highlight=False)
        for line in checks:
            out_console.print(f"  {line}", highlight=False)
        return
    if run_dir is not None:
        folder = run_dir
        out_console.print(run_user(lambda: report_text(_run_privacy(folder))))


def _planned(
    config: Path, overrides: list[str]
) -> tuple[Any, dict[str, int], Any, list[str], int | None, list[float]]:
    """The plan for a scenario: site sizes from its partition (written to a scratch folder),
    each virtual site's policy check against its ledger, the trained parameter count, and
    (record-level DP on) per-record gradient norms of the initial model on up to 64 of the
    virtual sites' records: this runs on the user's machine, over the user's scenario."""
    import tempfile

    from client.policy import read_policy
    from client.privacy_site import plan_check
    from common.core.config import load_config
    from common.core.config.simulation import VIRTUAL_SITE_POLICY
    from common.privacy.report import plan
    from simulations.run import prepare

    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = prepare(cfg, Path(tmp))
        sites = sorted((Path(tmp) / "sites").iterdir())
        counts = {p.name: sum(1 for _ in (p / "records.jsonl").open()) for p in sites}
        policies = {
            site: read_policy({}, Path(tmp) / VIRTUAL_SITE_POLICY.format(site=site))
            for site in counts
        }
        model = _trained_model(cfg)
        norms = _grad_norms(model, cfg, sites) if cfg.privacy.record.enabled else []
    checks = [plan_check(policies[site], cfg, n, site) for site, n in counts.items()]
    size = _update_size(model, cfg) if model is not None else None
    dim = size if cfg.institution_noise_at == "sites" else None
    return cfg, counts, plan(cfg, counts, dim), checks, size, norms


def _grad_norms(model: Any, cfg: Any, sites: list[Path], limit: int = 64) -> list[float]:
    """Per-record gradient norms of the initial model, on records drawn from every site."""
    from common.core.records import read_folder
    from common.core.tasks import record_grad_norms

    per_site = max(1, limit // max(1, len(sites)))
    records = [r for s in sites for r in read_folder(s, cfg.data.form, cfg.data.labels)[:per_site]]
    return record_grad_norms(model[0], model[1], records[:limit], cfg)


def _trained_model(cfg: Any) -> tuple[Any, Any] | None:
    """(model with adapters, tokenizer) as the sites start, built only when a DP level is on
    (the plan's figures need it)."""
    if not (cfg.privacy.record.enabled or cfg.institution_noise_at == "sites"):
        return None
    from common.core.adapters import attach_lora
    from common.core.models import load_base

    loaded = load_base(cfg.model, cfg.data.labels)
    if cfg.model.head_input == "whitened":  # the map the coordinator would send
        from common.core import headinput

        mcfg = cfg.model
        whitening = headinput.reference_whitening(
            loaded.model, loaded.tokenizer, mcfg.head_reference, mcfg.max_length, mcfg.cache_dir
        )
        headinput.set_whitening(loaded.model, whitening)
    return attach_lora(loaded.model, cfg.lora, cfg.model), loaded.tokenizer


def _update_size(model: tuple[Any, Any], cfg: Any) -> int:
    """The exchanged update's length, which is also what DP-SGD trains and noises (the
    distributed discrete Gaussian's bound and the noise outlook need it)."""
    from common.core.adapters import exchanged_keys, get_state

    peft_model = model[0]
    return sum(v.size for v in get_state(peft_model, exchanged_keys(peft_model, cfg.lora)).values())


def _run_privacy(run_dir: Path) -> dict[str, Any]:
    import json

    from common.core.errors import PrivacyError

    path = run_dir / "summary.json"
    if not path.is_file():
        raise PrivacyError(f"`{path}` does not exist: is `{run_dir}` a finished run folder?")
    summary = json.loads(path.read_text(encoding="utf-8"))
    if "privacy" not in summary:
        raise PrivacyError(f"run `{run_dir}` trained without differential privacy: no guarantee")
    return {k: v for k, v in summary["privacy"].items() if k != "statement"}


ledger_app = typer.Typer(no_args_is_help=True, help="A site's privacy ledger (site operators).")
app.add_typer(ledger_app, name="ledger")
StateDir = Annotated[Path, typer.Argument(help="The site's state folder (`state-dir`).")]


@ledger_app.command("show")
def ledger_show(state_dir: StateDir) -> None:
    """Per dataset: runs, rounds, record-level epsilon spent (all runs composed, at the site's
    delta) and the budget left."""
    from client.privacy_site import ledger_report

    reports = run_user(lambda: ledger_report(state_dir))
    if not reports:
        out_console.print(f"no ledger in {state_dir}: nothing spent yet")
    for r in reports:
        left = "no cap" if r.remaining is None else f"{r.remaining:.3f} left of {r.max_epsilon:.3f}"
        out_console.print(
            f"dataset {r.dataset}: {len(r.runs)} run(s), {r.rounds} round(s), epsilon "
            f"{r.epsilon:.3f} spent at delta {r.delta:.2e}; {left}",
            highlight=False,
        )
        for run, (rounds, eps) in r.runs.items():
            n = "rounds not recorded" if rounds is None else f"{rounds} round(s)"
            at = "" if eps is None else f", epsilon {eps:.3f} at the run's delta"
            out_console.print(f"  run {run}: {n}{at}", highlight=False)
        for when in r.resets:
            out_console.print(f"  reset by the operator at {when}", highlight=False)


@ledger_app.command("reset")
def ledger_reset(
    state_dir: StateDir,
    dataset: Annotated[str, typer.Option("--dataset", help="The dataset id to reset.")],
    yes: Annotated[bool, typer.Option("--yes", help="Yes: forget what it has spent.")] = False,
) -> None:
    """Forget what a dataset's records have spent (the operator's explicit decision)."""
    from client.privacy_site import reset_ledger

    if not yes:
        console.print(
            f"[bold red]error:[/] resetting `{dataset}` forgets the privacy its records have "
            "already lost; add `--yes` if that is what you mean",
            highlight=False,
        )
        raise typer.Exit(2)
    before = run_user(lambda: reset_ledger(state_dir, dataset))
    out_console.print(
        f"reset dataset {dataset}: forgot {len(before.runs)} run(s), epsilon {before.epsilon:.3f}",
        highlight=False,
    )


data_app = typer.Typer(no_args_is_help=True, help="Inspect and prepare a site's records.")
app.add_typer(data_app, name="data")
ConfigOrNone = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config (model for token lengths, rules).")
]


@data_app.command("check")
def data_check(
    folder: Annotated[Path, typer.Argument(help="The site's data folder.")],
    config: ConfigOrNone = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
) -> None:
    """Report records, fields, labels, lengths, malformed lines, duplicates, personal data
    (counts only). Exit 0 if the folder is usable for training."""
    from cli.data import data_check as check

    raise typer.Exit(check(folder, config, as_json))


@data_app.command("prepare")
def data_prepare(
    folder: Annotated[Path, typer.Argument(help="The site's data folder (never modified).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the prepared copy.")],
    clean: Annotated[
        bool, typer.Option("--clean", help="HTML, control chars, Unicode, space.")
    ] = False,
    dedup: Annotated[bool, typer.Option("--dedup", help="Exact and near duplicates.")] = False,
    redact: Annotated[
        bool, typer.Option("--redact", help="Personal data -> [EMAIL], [PHONE]...")
    ] = False,
    config: ConfigOrNone = None,
) -> None:
    """Write a cleaned copy and a report of every change (the original stays as it is)."""
    from cli.data import data_prepare as prepare

    raise typer.Exit(prepare(folder, out, clean, dedup, redact, config))


certs_app = typer.Typer(no_args_is_help=True, help="TLS certificates and site node keys.")
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the CA and server cert.")],
    name: Annotated[
        list[str] | None, typer.Option("--name", help="DNS name of the SuperLink (repeat).")
    ] = None,
    ip: Annotated[
        list[str] | None, typer.Option("--ip", help="IP of the SuperLink (repeat).")
    ] = None,
) -> None:
    """Create a certificate authority and the SuperLink's TLS certificate (keys 0600)."""
    from common.identity.certs import certs_init as init

    run_user(lambda: init(out, name or [], ip or []))


@certs_app.command("site")
def certs_site(
    name: Annotated[str, typer.Argument(help="The site's name, e.g. st-marys.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the site's key pair.")],
    ca_key: Annotated[
        Path | None, typer.Option("--ca-key", help="Identity CA key: also issue the identity.")
    ] = None,
    ca_cert: Annotated[
        Path | None, typer.Option("--ca-cert", help="Identity CA certificate (with --ca-key).")
    ] = None,
) -> None:
    """Create a site's node key pair (register the .pub with the SuperLink) and its identity key
    for secure aggregation: a CSR for the identity CA, or with --ca-key and --ca-cert the cert."""
    from common.identity.certs import certs_site as site

    run_user(lambda: site(name, out, ca_key, ca_cert))


@certs_app.command("identity-ca")
def certs_identity_ca(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the identity CA.")],
) -> None:
    """Create the federation's identity CA (held by the consortium, not the coordinator)."""
    from common.identity.certs import certs_identity_ca as identity_ca

    run_user(lambda: identity_ca(out))


@certs_app.command("issue")
def certs_issue(
    csr: Annotated[Path, typer.Argument(help="A site's NAME.identity.csr.")],
    ca_key: Annotated[Path, typer.Option("--ca-key", help="The identity CA's private key.")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert", help="The identity CA's certificate.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the certificate.")],
) -> None:
    """Issue a site's identity certificate from its CSR (check its fingerprint out of band)."""
    from common.identity.certs import certs_issue as issue

    run_user(lambda: issue(csr, ca_key, ca_cert, out))


@app.command("site-exec")
def site_exec(
    runtime_api_address: Annotated[
        str, typer.Option("--runtime-api-address", help="The SuperNode's Runtime API (host:port).")
    ] = "127.0.0.1:9094",
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain HTTP to the Runtime API (loopback).")
    ] = False,
    root_certificates: Annotated[
        Path | None, typer.Option("--root-certificates", help="CA of the Runtime API's TLS.")
    ] = None,
    auth_secret_file: Annotated[
        Path | None,
        typer.Option(
            "--superexec-auth-secret-file",
            help="The secret also given to the SuperNode's --superexec-auth-secret-file.",
        ),
    ] = None,
    poll_interval: Annotated[
        float, typer.Option("--poll-interval", help="Seconds between task polls.")
    ] = 0.2,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", help="Serve this site's own Prometheus metrics here."),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Where the site's metrics listen.")
    ] = "127.0.0.1",
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="The site's ledger folder: its spending in the metrics."),
    ] = None,
) -> None:
    """Run ClientApp tasks from warm forks (beside `flower-supernode --isolation process`)."""
    from client.site_exec import run_site_exec

    metrics = (metrics_host, metrics_port, state_dir) if metrics_port is not None else None

    def go() -> None:
        run_site_exec(
            runtime_api_address, insecure, root_certificates, auth_secret_file, poll_interval,
            metrics=metrics,
        )  # fmt: skip

    run_user(go)


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
        rounds.add_row(str(i), _num(loss), _bytes(up), _bytes(down))
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
