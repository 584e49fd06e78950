"""``fedtune serve``: an OpenAI-compatible HTTP API over a verified, published model folder.

Standard library HTTP server (one thread per connection); generation is serialized in
:class:`server.serving.generation.Engine`. The signature and hashes are checked before anything is
loaded: a folder that fails verification is never served.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.identity.signing import load_public_key, verify_folder
from server.serving.generation import ApiError, Engine, GenRequest, GenResult, Kind
from server.serving.metrics import Metrics

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
SOCKET_TIMEOUT_S = 30.0  # a client that stops sending mid-request cannot hold a thread forever


class FedtuneHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine, api_key: str | None) -> None:
        super().__init__(address, _Handler)
        self.engine, self.api_key, self.metrics = engine, api_key, Metrics()
        self.started = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[0], self.server_address[1]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    server: FedtuneHTTPServer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    # ------------------------------------------------------------------------------- dispatch

    def _dispatch(self, method: str) -> None:
        start, self._status, self._sent_headers = time.perf_counter(), 0, False
        self._body_read = False
        path = urlsplit(self.path).path.rstrip("/") or "/"
        route = _ROUTES.get(path)
        label = path if route else "other"
        try:
            if route is None:
                raise ApiError(404, f"no route `{path}`", code="not_found")
            if method != route[0]:
                raise ApiError(405, f"`{path}` accepts {route[0]} only", code="method_not_allowed")
            if route[2]:
                self._check_auth()
            route[1](self)
        except ApiError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self._status, self.close_connection = self._status or 499, True
        except Exception:
            logger.exception("internal error on %s", path)
            self._send_error(ApiError(500, "internal server error", None, "internal_error",
                                      "server_error"))  # fmt: skip
        finally:
            self.server.metrics.observe(label, self._status, time.perf_counter() - start)

    def _send_error(self, err: ApiError) -> None:
        if not self._body_read and self.headers.get("Content-Length", "0") != "0":
            # The unread body would be parsed as the next request on a kept-alive connection.
            self.close_connection = True
        try:
            self._send_json(err.status, err.body())
        except OSError:  # the client is gone; nothing left to tell it
            self._status, self.close_connection = self._status or 499, True

    def _check_auth(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        # compare_digest: the time taken does not reveal how much of the key matched
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "Incorrect or missing API key", code="invalid_api_key")

    def _read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise ApiError(411, "a `Content-Length` header is required", code="length_required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="too_large")
        raw = self.rfile.read(int(length))
        self._body_read = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(
                400, f"request body is not valid JSON: {err}", code="invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        return body

    # ------------------------------------------------------------------------------ responses

    def _send_json(self, status: int, payload: dict[str, Any] | list[Any]) -> None:
        if self._sent_headers:  # mid-stream: the status is gone; tell the client in-band
            self._write_event(payload)
            return
        data = json.dumps(payload).encode()
        self._start(status, "application/json", len(data))
        self.wfile.write(data)

    def _send_text(self, status: int, text: str, content_type: str) -> None:
        data = text.encode()
        self._start(status, content_type, len(data))
        self.wfile.write(data)

    def _start(self, status: int, content_type: str, length: int | None) -> None:
        self._status, self._sent_headers = status, True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if length is None:  # server-sent events: the body ends when the connection closes
            self.send_header("Cache-Control", "no-cache")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _write_event(self, payload: dict[str, Any] | list[Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    # ------------------------------------------------------------------------------ endpoints

    def _health(self) -> None:
        self._send_json(200, {"status": "ok", "model": self.server.engine.model_id})

    def _metrics(self) -> None:
        self._send_text(200, self.server.metrics.render(), "text/plain; version=0.0.4")

    def _models(self) -> None:
        card = {"id": self.server.engine.model_id, "object": "model",
                "created": self.server.started, "owned_by": "fedtune"}  # fmt: skip
        self._send_json(200, {"object": "list", "data": [card]})

    def _chat(self) -> None:
        self._complete("chat")

    def _completions(self) -> None:
        self._complete("completion")

    def _complete(self, kind: Kind) -> None:
        engine = self.server.engine
        req = engine.parse(kind, self._read_json())
        ids = {"id": _new_id(kind), "created": int(time.time()), "model": engine.model_id}
        if req.stream:
            result = self._stream(req, ids)
        else:
            result = engine.generate(req, lambda _delta: None)
            self._send_json(200, _full_response(kind, ids, result))
        self.server.metrics.add_tokens(result.prompt_tokens, result.completion_tokens)

    def _stream(self, req: GenRequest, ids: dict[str, Any]) -> GenResult:
        chunk = _chunk_maker(req.kind, ids)
        self._start(200, "text/event-stream", None)
        if req.kind == "chat":
            self._write_event(chunk({"role": "assistant", "content": ""}, None))
        result = self.server.engine.generate(req, lambda d: self._write_event(chunk(d, None)))
        self._write_event(chunk(None, result.finish_reason))
        if req.include_usage:
            self._write_event({**chunk(None, None), "choices": [], "usage": _usage(result)})
        self._write_event("[DONE]")
        return result


Route = tuple[str, Callable[[_Handler], None], bool]  # method, handler, needs the API key
_ROUTES: dict[str, Route] = {
    "/health": ("GET", _Handler._health, False),
    "/metrics": ("GET", _Handler._metrics, True),
    "/v1/models": ("GET", _Handler._models, True),
    "/v1/completions": ("POST", _Handler._completions, True),
    "/v1/chat/completions": ("POST", _Handler._chat, True),
}


def _new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def _usage(result: GenResult) -> dict[str, int]:
    total = result.prompt_tokens + result.completion_tokens
    return {"prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "total_tokens": total}  # fmt: skip


def _full_response(kind: Kind, ids: dict[str, Any], result: GenResult) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": result.text}}
        obj = "chat.completion"
    else:
        choice, obj = {"text": result.text}, "text_completion"
    choice |= {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
    return {**ids, "object": obj, "choices": [choice], "usage": _usage(result)}


def _chunk_maker(kind: Kind, ids: dict[str, Any]) -> Callable[[Any, str | None], dict[str, Any]]:
    """Chunks in OpenAI's streaming format; ``delta`` None means an empty delta."""

    def chunk(delta: Any, finish: str | None) -> dict[str, Any]:
        if kind == "chat":
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice: dict[str, Any] = {"delta": content}
            obj = "chat.completion.chunk"
        else:
            choice, obj = {"text": delta or ""}, "text_completion"
        choice |= {"index": 0, "finish_reason": finish, "logprobs": None}
        return {**ids, "object": obj, "choices": [choice]}

    return chunk


# -------------------------------------------------------------------------------- library API


def load_engine(model_dir: str | Path, public_key_path: str | Path, model_id: str | None) -> Engine:
    """Verify the folder (raises IntegrityError), then load model and tokenizer from it."""
    folder = Path(model_dir)
    verify_folder(folder, load_public_key(public_key_path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    return Engine(model, tokenizer, model_id or folder.resolve().name)


def make_server(
    model_dir: str | Path,
    public_key_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_id: str | None = None,
    threads: int = 0,
) -> FedtuneHTTPServer:
    """A bound, not yet running server (``port=0`` picks a free port; see ``server.url``).

    ``threads``: torch CPU threads (0 = torch's default). On a shared CPU, fewer threads than cores
    avoids OpenMP spin-waiting against other processes, which can slow generation many times over.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    engine = load_engine(model_dir, public_key_path, model_id)
    server = FedtuneHTTPServer((host, port), engine, api_key or None)
    logger.info("serving `%s` on %s (API key %s)", engine.model_id, server.url,
                "required" if api_key else "not required")  # fmt: skip
    return server


def serve(
    model_dir: str | Path,
    public_key_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_id: str | None = None,
    ready: Callable[[FedtuneHTTPServer], None] | None = None,
    threads: int = 0,
) -> None:
    """Verify, load and serve until interrupted."""
    server = make_server(model_dir, public_key_path, host, port, api_key, model_id, threads)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("interrupted; shutting down")
    finally:
        server.server_close()


def main_serve(
    model_dir: Path,
    public_key: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_id: str | None = None,
    threads: int = 0,
) -> None:
    """CLI body of ``fedtune serve``; the key may also come from ``FEDTUNE_API_KEY``."""
    key = api_key or os.environ.get("FEDTUNE_API_KEY") or None
    serve(model_dir, public_key, host, port, key, model_id, ready=_announce, threads=threads)


def _announce(server: FedtuneHTTPServer) -> None:
    print(f"fedtune serve: listening on {server.url}", flush=True)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.serving.serve", description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--public-key", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="or set FEDTUNE_API_KEY")
    parser.add_argument("--model-id", default=None, help="model name (default: folder name)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    from common.core.errors import FedtuneError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = _parse_args(sys.argv[1:])
    try:
        main_serve(args.model_dir, args.public_key, args.host, args.port, args.api_key,
                   args.model_id, args.threads)  # fmt: skip
    except FedtuneError as error:
        print(f"fedtune serve: {error}", file=sys.stderr)
        sys.exit(2)
