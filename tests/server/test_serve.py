"""`serve`: the real openai client against a server process; bad requests; batching; refusal."""

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
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.core.errors import IntegrityError, ModelError
from server.serving.engine import EngineLimits
from server.serving.serve import ServeOptions, Server, make_server

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-not-a-secret"
HI: Any = [{"role": "user", "content": "hello there"}]
CHAT = "/v1/chat/completions"
DONE = "/v1/completions"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(proc: subprocess.Popen[str], url: str, timeout_s: float = 90.0) -> None:
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
            "--port", str(port), "--threads", "1"]  # fmt: skip


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


def _started(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local(published: Path, keys: tuple[Path, Path]) -> Iterator[Server]:
    """An in-process server on a free port, for the many small request checks."""
    yield from _started(make_server(published, keys[1], ServeOptions(port=0)))


def _request(server: Server, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, str]:  # fmt: skip
    host, port = server.socket.getsockname()[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=60)
    data = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read().decode(errors="replace")
    conn.close()
    return resp.status, text


def _complete(server: Server, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"model": "tiny-model", "prompt": prompt, "max_tokens": 16, "temperature": 0, **extra}
    status, text = _request(server, "POST", DONE, body)
    assert status == 200, text
    return dict(json.loads(text))


# ------------------------------------------------------------------------------ openai client


def test_openai_client_lists_models_and_chats(client: openai.OpenAI, published: Path) -> None:
    assert [m.id for m in client.models.list().data] == [published.name]
    assert client.models.retrieve(published.name).id == published.name
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
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 12


def test_openai_client_completions_stream(client: openai.OpenAI, published: Path) -> None:
    kwargs: dict[str, Any] = {"model": published.name, "prompt": "abc", "max_tokens": 10,
                              "temperature": 0}  # fmt: skip
    full = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    assert streamed == full


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
    for path in ("/v1/models", "/metrics"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server_process}{path}", timeout=10)
        assert err.value.code == 401 and err.value.headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(err.value.read())["error"]["code"] == "invalid_api_key"
    with urllib.request.urlopen(f"{server_process}/health", timeout=10) as resp:  # no key needed
        assert json.loads(resp.read())["status"] == "ok"


def test_openapi_describes_what_is_served(server_process: str) -> None:
    with urllib.request.urlopen(f"{server_process}/openapi.json", timeout=10) as resp:
        doc = json.loads(resp.read())
    assert set(doc["paths"]) == {"/health", "/metrics", "/v1/models", "/v1/models/{model}",
                                 DONE, CHAT}  # fmt: skip
    chat = doc["paths"][CHAT]["post"]
    assert "422" not in chat["responses"] and {"200", "400", "401", "404", "429"} <= set(
        chat["responses"]
    )
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["security"] == [{"HTTPBearer": []}]
    request = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert request["additionalProperties"] is False
    assert request["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 1024  # the tiny context
    assert "HTTPValidationError" not in doc["components"]["schemas"]


# ------------------------------------------------------------------------------- bad requests

BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    ("POST", CHAT, "{not json", 400, None),
    ("POST", CHAT, "[1, 2]", 400, None),
    ("POST", CHAT, b'{"model": "tiny-model", "messages": "\xff\xfe"}', 400, None),
    ("POST", CHAT, "", 400, None),
    ("POST", CHAT, {"messages": HI}, 400, "model"),
    ("POST", CHAT, {"model": "nope", "messages": HI}, 404, "model"),
    ("POST", CHAT, {"model": "tiny-model", "messages": []}, 400, "messages"),
    ("POST", CHAT, {"model": "tiny-model", "messages": "hi"}, 400, "messages"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "logprobs": True}, 400, "logprobs"),
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
    (
        "POST",
        CHAT,
        {"model": "tiny-model", "messages": [{"role": "user", "content": "\ud800"}]},
        400,
        "messages",
    ),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "max_tokens": -1}, 400, "max_tokens"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "max_tokens": 10**6}, 400, "max_tokens"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "max_tokens": "5"}, 400, "max_tokens"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "max_tokens": True}, 400, "max_tokens"),
    ("POST", CHAT, {"model": "tiny-model", "messages": HI, "temperature": 9}, 400, "temperature"),
    (
        "POST",
        CHAT,
        '{"model": "tiny-model", "messages": [], "temperature": NaN}',
        400,
        "temperature",
    ),
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
    ("POST", DONE, {"model": "tiny-model", "prompt": ""}, 400, "prompt"),
    ("POST", DONE, {"model": "tiny-model", "prompt": [1, 2]}, 400, "prompt"),
    ("POST", DONE, {"model": "tiny-model", "prompt": "hi", "max_tokens": 1023}, 400, "prompt"),
    ("GET", CHAT, None, 405, None),
    ("GET", "/v1/nothing", None, 404, None),
    ("GET", "/v1/models/gpt-4", None, 404, "model"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(
    local: Server, method: str, path: str, body: Any, status: int, param: str | None
) -> None:
    got, text = _request(local, method, path, body)
    assert got == status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_oversized_bodies_are_413_declared_or_not(local: Server) -> None:
    host, port = local.socket.getsockname()[:2]
    with socket.create_connection((host, port), timeout=30) as sock:  # refused before it is sent
        sock.sendall(
            f"POST {DONE} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 21}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    with socket.create_connection((host, port), timeout=30) as sock:  # chunked: no length given
        sock.sendall(
            f"POST {DONE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"x" * 65536
        try:
            for _ in range(20):
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:  # the server answered and closed while we were still sending
            pass
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")


def test_completions_stop_and_metrics_parse(local: Server) -> None:
    full = _complete(local, "abc", max_tokens=20)["choices"][0]["text"]
    assert len(full) >= 2
    stopped = _complete(local, "abc", max_tokens=20, stop=full[1])["choices"][0]
    assert stopped["text"] == full[: full.index(full[1])]
    assert stopped["finish_reason"] == "stop"
    status, text = _request(local, "GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value
                for s in families["fedtune_requests"].samples
                if s.name.endswith("_total")}  # fmt: skip
    assert requests[(DONE, "200")] >= 2
    buckets = [s for s in families["fedtune_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["route"] == DONE]  # fmt: skip
    assert buckets and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 2
    generated = families["fedtune_generated_tokens"].samples[0]
    assert generated.labels["model"] == "tiny-model" and generated.value >= 2
    assert families["fedtune_queue_depth"].samples[0].value == 0
    info = families["fedtune_model_info"].samples[0]
    assert info.labels["model"] == "tiny-model" and info.labels["source"].startswith("published:")
    assert families["fedtune_batch_size"].type == "histogram"


def test_concurrent_requests_are_batched_and_do_not_interleave(local: Server) -> None:
    prompts = [f"prompt number {i}: " for i in range(4)]
    sequential = [_complete(local, p)["choices"][0]["text"] for p in prompts]
    engine = local.engine
    before = engine.batches
    results: dict[int, str] = {}
    barrier = threading.Barrier(4)

    def ask(i: int) -> None:
        barrier.wait()
        results[i] = _complete(local, prompts[i])["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(4)] == sequential
    assert engine.batches - before < 4  # at least two requests shared one generate call


def test_client_hanging_up_mid_stream_frees_the_server(local: Server) -> None:
    host, port = local.socket.getsockname()[:2]
    body = json.dumps({"model": "tiny-model", "messages": HI, "max_tokens": 900, "stream": True})
    request = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()  # fmt: skip
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        assert b"text/event-stream" in sock.recv(4096)
    start = time.monotonic()
    status, _ = _request(local, "POST", CHAT, {"model": "tiny-model", "messages": HI,
                                                "max_tokens": 2})  # fmt: skip
    assert status == 200
    assert time.monotonic() - start < 20  # did not wait for 900 tokens nobody reads


def test_refused_body_does_not_poison_a_kept_alive_connection(local: Server) -> None:
    host, port = local.socket.getsockname()[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=30)
    conn.request("POST", "/v1/nothing", body=json.dumps({"model": "tiny-model"}))
    first = conn.getresponse()
    first.read()
    conn.request("GET", "/health")
    second = conn.getresponse()
    assert (first.status, second.status) == (404, 200)
    assert json.loads(second.read())["status"] == "ok"
    conn.close()


# --------------------------------------------------------------------------- queue and floods


def test_a_full_queue_is_429_never_5xx(published: Path, keys: tuple[Path, Path]) -> None:
    limits = EngineLimits(max_batch=1, max_queue=1, gather_s=0.0)
    server = make_server(published, keys[1], ServeOptions(port=0, limits=limits))
    statuses: list[int] = []
    bodies: list[str] = []

    def ask(i: int) -> None:
        body = {"model": "tiny-model", "prompt": f"flood {i}", "max_tokens": 200, "seed": i}
        status, text = _request(server, "POST", DONE, body)
        statuses.append(status)
        bodies.append(text)

    for _ in _started(server):
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        after = _request(
            server, "POST", DONE, {"model": "tiny-model", "prompt": "a", "max_tokens": 2}
        )
    assert len(statuses) == 12 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1
    assert after[0] == 200  # the flood passed; nothing is stuck
    refused = json.loads(bodies[statuses.index(429)])["error"]
    assert refused["code"] == "queue_full"


# ------------------------------------------------------------------------------------ adapters


def test_adapters_over_one_base_match_the_merged_folder(
    published: Path, tiny_run: Path, keys: tuple[Path, Path], local: Server
) -> None:
    adapters = {"final": published, "round-1": tiny_run / "rounds" / "1", "run": tiny_run}
    server = make_server(None, keys[1], ServeOptions(port=0), adapters=adapters,
                         base=str(tiny_run))  # fmt: skip
    for _ in _started(server):
        _, text = _request(server, "GET", "/v1/models")
        assert [m["id"] for m in json.loads(text)["data"]] == ["final", "round-1", "run"]
        texts = {name: _complete(server, "abc", model=name)["choices"][0]["text"]
                 for name in adapters}  # fmt: skip
    merged = _complete(local, "abc")["choices"][0]["text"]
    assert texts["final"] == merged == texts["run"]  # adapter kept apart == merged weights


def test_adapters_need_a_base_and_a_key(published: Path, tiny_run: Path) -> None:
    with pytest.raises(ModelError, match=r"--public-key"):
        make_server(None, None, adapters={"a": published}, base=str(tiny_run))
    with pytest.raises(ModelError, match=r"--base"):
        make_server(None, None, adapters={"a": tiny_run / "rounds" / "1"})
    with pytest.raises(ModelError, match=r"not both"):
        make_server(published, None, adapters={"a": tiny_run})


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
    with pytest.raises(IntegrityError, match=r"model\.safetensors"):
        make_server(folder, keys[1], ServeOptions(port=0))
    proc = subprocess.run(_serve_cmd(folder, keys[1], _free_port()), cwd=REPO, timeout=60,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert "model.safetensors" in proc.stderr
