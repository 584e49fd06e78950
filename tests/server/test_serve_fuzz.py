"""Schemathesis against `/openapi.json` of a running server: no 5xx, no schema violations.

`schemathesis run` (the CLI a site's QA team would use) generates valid and invalid requests from
the document the server publishes, bounded in examples and time. Every check runs except
`positive_data_acceptance`: a request the schema allows may still be refused, rightly, by what
the schema cannot know (an unknown model id is OpenAI's 404; prompt + `max_tokens` over the
context window is a 400).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.serving.engine import EngineLimits
from server.serving.serve import ServeOptions, make_server

KEY = "fuzz-key-not-a-secret"


def _schemathesis() -> str:
    found = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(found).exists():
        pytest.fail("schemathesis is not installed: it is in the `dev` extra (make setup)")
    return found


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(
    published: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    # A 16-token cap keeps each generating example short; the document states the cap.
    options = ServeOptions(port=0, api_key=KEY, threads=1, limits=EngineLimits(max_tokens=16))
    server = make_server(published, keys[1], options)
    server.start()
    report = tmp_path / "report.json"
    cmd = [_schemathesis(), "run", f"{server.url}/openapi.json", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--max-examples", "12", "--seed", "7",
           "--max-time", "60", "--workers", "1", "--request-timeout", "30", "--no-shrink",
           "-H", f"Authorization: Bearer {KEY}", "--report", "json",
           "--report-json-path", str(report)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        server.stop()
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert "passed" in proc.stdout, tail
    summary = json.loads(report.read_text()) if report.is_file() else {}
    assert not summary.get("failures"), tail
    assert summary["test_cases"]["generated"] > 100, summary["test_cases"]  # it did fuzz
    print(json.dumps({"test_cases": summary["test_cases"], "phases": summary["phases"]}))
