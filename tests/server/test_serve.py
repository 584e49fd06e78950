"""`serve`: the real openai client against a server process; bad requests; concurrency; refusal."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from common.core.errors import IntegrityError
from server.serving.serve import FedtuneHTTPServer, make_server

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-not-a-secret"
HI = [{"role": "user", "content": "hello there"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(proc: subprocess.Popen[str], url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.communicate()[1][-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not become healthy in time")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _serve_cmd(folder: Path, pub: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "server.serving.serve", str(folder), "--public-key", str(pub),
            "--port", str(port)]  # fmt: skip


@pytest.fixture(scope="module")
def server_process(published: Path, keys: tuple[Path, Path]) -> Iterator[str]:
    """`python -m server.serving.serve` (the CLI's body) as a separate process, with an API key."""
    port = _free_port()
    env = {**os.environ, "FEDTUNE_API_KEY": API_KEY}
    cmd = _serve_cmd(published, keys[1], port)
    out = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **out)  # type: ignore[call-overload]
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def client(server_process: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server_process}/v1", api_key=API_KEY, max_retries=0, timeout=30
    )


@pytest.fixture(scope="module")
def local(published: Path, keys: tuple[Path, Path]) -> Iterator[FedtuneHTTPServer]:
    """An in-process server on a free port, for the many small request checks."""
    server = make_server(published, keys[1], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _request(server: FedtuneHTTPServer, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, str]:  # fmt: skip
    host, port = server.server_address[0], server.server_address[1]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=30)
    data = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


# ------------------------------------------------------------------------------ openai client


def test_openai_client_lists_models_and_chats(client: openai.OpenAI, published: Path) -> None:
    assert [m.id for m in client.models.list().data] == [published.name]
    reply = client.chat.completions.create(
        model=published.name, messages=HI, max_tokens=8, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens > len("hello there")  # chat template tokens were added


def test_openai_client_streams_the_same_text(client: openai.OpenAI, published: Path) -> None:
    kwargs: dict[str, Any] = {"model": published.name, "messages": HI, "max_tokens": 12,
                              "temperature": 0}  # fmt: skip
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_client_gets_errors(client: openai.OpenAI, published: Path) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=published.name, messages=[], max_tokens=4)
    assert err.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError, match=r"model_not_found|does not exist"):
        client.chat.completions.create(model="gpt-4", messages=HI, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens"):
        client.chat.completions.create(model=published.name, messages=HI, max_tokens=0)


def test_wrong_or_missing_api_key_is_401(server_process: str, published: Path) -> None:
    bad = openai.OpenAI(base_url=f"{server_process}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server_process}/v1/models", timeout=10)
    assert err.value.code == 401
    assert json.loads(err.value.read())["error"]["code"] == "invalid_api_key"


# ------------------------------------------------------------------------------- bad requests

CHAT = "/v1/chat/completions"
BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    ("POST", CHAT, "{not json", 400, None),
    ("POST", CHAT, "[1, 2]", 400, None),
    ("POST", CHAT, {"messages": HI}, 400, "model"),
    ("POST", CHAT, {"model": "nope", "messages": HI}, 404, "model"),
    ("POST", CHAT, {"model": "tiny-model", "messages": []}, 400, "messages"),
    ("POST", CHAT, {"model": "tiny-model", "messages": "hi"}, 400, "messages"),
    (
        "POST",
        CHAT,
        {"model": "tiny-model", "messages": [{"role": "x", "content": "a"}]},
        400,
        "messages[0].role",
    ),
    (
        "POST",
        CHAT,
        {"model": "tiny-model", "messages": [{"role": "user", "content": 3}]},
        400,
        "messages[0].content",
    ),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "max_tokens": -1}, 400, "max_tokens"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "max_tokens": 10**6}, 400, "max_tokens"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "max_tokens": "5"}, 400, "max_tokens"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "max_tokens": True}, 400, "max_tokens"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "temperature": 9}, 400, "temperature"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "stream": "yes"}, 400, "stream"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "n": 2}, 400, "n"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "stop": [""]}, 400, "stop"),
    (
        "POST",
        CHAT,
        {"model": "tiny-model", "messages": [{"role": "user", "content": "x" * 1100}]},
        400,
        "messages",
    ),
    ("POST", "/v1/completions", {"model": "tiny-model", "prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "tiny-model", "prompt": [1, 2]}, 400, "prompt"),
    (
        "POST",
        "/v1/completions",
        {"model": "tiny-model", "prompt": "hi", "max_tokens": 1023},
        400,
        "prompt",
    ),
    ("GET", CHAT, None, 405, None),
    ("GET", "/v1/nothing", None, 404, None),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(
    local: FedtuneHTTPServer, method: str, path: str, body: Any, status: int, param: str | None
) -> None:
    got, text = _request(local, method, path, body)
    assert got == status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_missing_content_length_is_411(local: FedtuneHTTPServer) -> None:
    host, port = local.server_address[0], local.server_address[1]
    with socket.create_connection((str(host), int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 411")


def test_completions_stop_and_metrics(local: FedtuneHTTPServer) -> None:
    body = {"model": "tiny-model", "prompt": "abc", "max_tokens": 20, "temperature": 0}
    status, text = _request(local, "POST", "/v1/completions", body)
    full = json.loads(text)["choices"][0]["text"]
    assert status == 200 and len(full) >= 2
    stopped = json.loads(_request(local, "POST", "/v1/completions", {**body, "stop": full[1]})[1])
    assert stopped["choices"][0]["text"] == full[: full.index(full[1])]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    status, metrics = _request(local, "GET", "/metrics")
    assert 'fedtune_requests_total{endpoint="/v1/completions",code="200"}' in metrics
    assert (
        'fedtune_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}' in metrics
    )
    assert "fedtune_generated_tokens_total" in metrics and status == 200


def test_concurrent_requests_do_not_interleave(local: FedtuneHTTPServer) -> None:
    prompts = [f"prompt number {i}: " for i in range(4)]

    def ask(prompt: str) -> str:
        body = {"model": "tiny-model", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        return str(
            json.loads(_request(local, "POST", "/v1/completions", body)[1])["choices"][0]["text"]
        )

    sequential = [ask(p) for p in prompts]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(prompts[i])))
               for i in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(4)] == sequential


def test_client_hanging_up_mid_stream_frees_the_server(local: FedtuneHTTPServer) -> None:
    host, port = local.server_address[0], local.server_address[1]
    body = json.dumps({"model": "tiny-model", "messages": HI, "max_tokens": 500, "stream": True})
    request = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()  # fmt: skip
    with socket.create_connection((str(host), int(port)), timeout=10) as sock:
        sock.sendall(request)
        assert b"text/event-stream" in sock.recv(4096)
    status, _ = _request(
        local, "POST", CHAT, {"model": "tiny-model", "messages": HI, "max_tokens": 2}
    )
    assert status == 200


# ------------------------------------------------------------------------------- verification


def test_serve_refuses_a_tampered_folder(
    published: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "tampered"
    shutil.copytree(published, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"`model\.safetensors` does not match"):
        make_server(folder, keys[1], port=0)
    proc = subprocess.run(_serve_cmd(folder, keys[1], _free_port()), cwd=REPO, timeout=60,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert "model.safetensors" in proc.stderr


def test_refused_body_does_not_poison_a_kept_alive_connection(local: FedtuneHTTPServer) -> None:
    host, port = local.server_address[0], local.server_address[1]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=30)
    conn.request("POST", "/v1/nothing", body=json.dumps({"model": "tiny-model"}))
    first = conn.getresponse()
    first.read()
    conn.request("GET", "/health")
    second = conn.getresponse()
    assert (first.status, second.status) == (404, 200)
    assert json.loads(second.read())["status"] == "ok"
    conn.close()
