"""``fedtune serve``: verify, load, and serve an OpenAI-compatible API with uvicorn.

The socket is bound before the server runs, so ``port=0`` gives a free port whose URL is known at
once (tests, the bench). The default address is 127.0.0.1: exposing the model is a choice
(``--host``). ``python -m server.serving.serve`` is the same as the CLI command.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from server.serving.app import create_app
from server.serving.engine import Engine, EngineLimits
from server.serving.loading import Loaded, load_adapters, load_published

logger = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """How to serve: address, key, limits. ``threads``: torch CPU threads (0 = torch's default);
    on a shared CPU fewer threads than cores avoid OpenMP spin-waiting against other processes."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    threads: int = 0
    limits: EngineLimits = field(default_factory=EngineLimits)


class Server:
    """A bound, not yet running uvicorn server over one engine."""

    def __init__(self, engine: Engine, options: ServeOptions) -> None:
        self.engine = engine
        self.app = create_app(engine, options.api_key)
        family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((options.host, options.port))
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, lifespan="off", ws="none")  # fmt: skip
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C or SIGTERM), then stop the engine."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.close()

    def start(self) -> None:
        """Serve from a background thread (tests); returns once requests are accepted."""
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]},
                                        daemon=True, name="fedtune-serve")  # fmt: skip
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            self._thread.join(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        self.close()

    def close(self) -> None:
        self.engine.close()
        self.socket.close()


def make_server(
    model_dir: str | Path | None,
    public_key: str | Path | None,
    options: ServeOptions | None = None,
    model_id: str | None = None,
    adapters: dict[str, Path] | None = None,
    base: str | None = None,
) -> Server:
    """Verify and load (a published folder, or ``base`` + ``adapters``); bind; do not run yet."""
    options = options or ServeOptions()
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    loaded = _load(model_dir, public_key, model_id, adapters, base)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.served, options.limits)
    server = Server(engine, options)
    logger.info("serving %s on %s (API key %s)", ", ".join(engine.model_ids), server.url,
                "required" if options.api_key else "not required")  # fmt: skip
    return server


def _load(
    model_dir: str | Path | None,
    public_key: str | Path | None,
    model_id: str | None,
    adapters: dict[str, Path] | None,
    base: str | None,
) -> Loaded:
    from common.core.errors import ModelError

    if (model_dir is None) == (not adapters):
        raise ModelError("serve either a published MODEL folder or `--adapter NAME=PATH` over a "
                         "base, not both")  # fmt: skip
    if model_dir is not None:
        if public_key is None:
            raise ModelError("`--public-key` is required to verify a published folder")
        return load_published(model_dir, public_key, model_id)
    return load_adapters(adapters or {}, base, public_key)


def serve(
    model_dir: str | Path | None,
    public_key: str | Path | None,
    options: ServeOptions | None = None,
    model_id: str | None = None,
    adapters: dict[str, Path] | None = None,
    base: str | None = None,
    ready: Callable[[Server], None] | None = None,
) -> None:
    """Verify, load and serve until interrupted."""
    server = make_server(model_dir, public_key, options, model_id, adapters, base)
    if ready is not None:
        ready(server)
    server.run()


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` pairs; a name is a model id clients will send."""
    from common.core.errors import ModelError

    found: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ModelError(f"`--adapter` must be NAME=PATH, got `{spec}`")
        if name in found:
            raise ModelError(f"`--adapter` name `{name}` is given twice")
        found[name] = Path(path)
    return found


def main_serve(
    model_dir: Path | None,
    public_key: Path | None,
    options: ServeOptions,
    model_id: str | None = None,
    adapter_specs: list[str] | None = None,
    base: str | None = None,
) -> None:
    """CLI body of ``fedtune serve``; the key may also come from ``FEDTUNE_API_KEY``."""
    options.api_key = options.api_key or os.environ.get("FEDTUNE_API_KEY") or None
    adapters = parse_adapters(adapter_specs or [])
    serve(model_dir, public_key, options, model_id, adapters, base, ready=_announce)


def _announce(server: Server) -> None:
    print(f"fedtune serve: listening on {server.url}", flush=True)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.serving.serve", description=__doc__)
    parser.add_argument("model_dir", type=Path, nargs="?", default=None)
    parser.add_argument("--public-key", type=Path, default=None)
    parser.add_argument("--adapter", action="append", default=[], help="NAME=PATH (repeat)")
    parser.add_argument("--base", default=None, help="model source or run folder for adapters")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="or set FEDTUNE_API_KEY")
    parser.add_argument("--model-id", default=None, help="model name (default: folder name)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests per generate call")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap per request")
    return parser.parse_args(argv)


if __name__ == "__main__":
    from common.core.errors import FedtuneError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = _parse_args(sys.argv[1:])
    limits = EngineLimits(args.max_batch, args.max_queue, max_tokens=args.max_tokens)
    opts = ServeOptions(args.host, args.port, args.api_key, args.threads, limits)
    try:
        main_serve(args.model_dir, args.public_key, opts, args.model_id, args.adapter, args.base)
    except (FedtuneError, ValueError) as error:
        print(f"fedtune serve: {error}", file=sys.stderr)
        sys.exit(2)
