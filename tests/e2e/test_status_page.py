"""The status page in a real headless browser (Debian's Chromium, driven through ChromeDriver's
W3C WebDriver HTTP API) while a tiny simulation runs: it loads, shows the rounds, and updates
itself without a reload."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SCENARIOS

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARGS = [  # what this machine's closed network needs (no background connections)
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"null")


def wait_until(what: str, check: Any, timeout: float, proc: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the simulation ended ({proc.returncode}) before {what}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A ChromeDriver session of headless Chromium: (WebDriver base URL, session id). A missing
    browser fails the test: `make test` installs Debian's chromium and chromium-driver."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).is_file(), f"{path} is missing: `make test` installs it (Debian's "
        "chromium and chromium-driver)"
    port = free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if call("GET", base + "/status")["value"]["ready"]:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        options = {"binary": CHROMIUM, "args": [*ARGS, f"--user-data-dir={tmp_path / 'chrome'}"]}
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
        session = call("POST", base + "/session", caps)["value"]["sessionId"]
        try:
            yield base, session
        finally:
            call("DELETE", f"{base}/session/{session}")
    finally:
        driver.terminate()
        driver.wait(timeout=10)


PAGE_STATE = """return {
  phase: document.getElementById('phase').textContent,
  round: document.getElementById('round').textContent,
  rows: document.querySelectorAll('#rows tbody tr').length,
  updates: Number(document.getElementById('updates').textContent),
  sites: document.querySelectorAll('#sites tbody tr').length,
  lines: document.querySelectorAll('#plot polyline').length,
};"""


def test_the_status_page_shows_a_running_simulation_and_updates(browser, tmp_path: Path):
    base, session = browser
    port, out = free_port(), tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200"}
    fedtune = shutil.which("fedtune", path=str(Path(sys.executable).parent)) or "fedtune"
    proc = subprocess.Popen(
        [fedtune, "simulate", "--config", str(SCENARIOS / "tiny.toml"), "--out", str(out),
         "--set", "federation.rounds=4", "--monitor-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    page = f"http://127.0.0.1:{port}/"
    try:

        def reachable() -> bool:
            try:
                urllib.request.urlopen(page + "status.json", timeout=2).close()
                return True
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_until("the live view to listen", reachable, 300, proc)
        call("POST", f"{base}/session/{session}/url", {"url": page})
        state = lambda: call(  # noqa: E731
            "POST", f"{base}/session/{session}/execute/sync", {"script": PAGE_STATE, "args": []}
        )["value"]
        first = wait_until("a round on the page", lambda: (s := state())["rows"] >= 1 and s,
                           300, proc)  # fmt: skip
        assert first["phase"] and int(first["round"]) >= 1 and first["sites"] == 3
        later = wait_until(
            "the page to show a later round by itself",
            lambda: (s := state())["rows"] > first["rows"] and s, 300, proc,
        )  # fmt: skip
        assert later["updates"] > first["updates"]  # the page polled; nobody reloaded it
        assert later["lines"] >= 1  # eval loss and accuracy plotted
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        assert "round 4/4" in output and "training" in output  # the progress lines
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
