"""`fedtune site-exec`: tasks fork from a forkserver that already imported the heavy modules.

The whole path (SuperNode in process isolation, site-exec, real ClientApp tasks) runs in
tests/e2e/test_deploy.py and test_deploy_faults.py; here the executor's own contract.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

from client.site_exec import ForkserverExecutor, is_loopback, run_site_exec
from common.core.errors import FedtuneError
from tests.conftest import ROOT


def _spec(task_type: TaskType) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type, runtime_api_address="127.0.0.1:1", token="t", insecure=True,
        root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
        suppress_output=False, task_id=7,
    )  # fmt: skip


PROBE = """
import sys
from client.site_exec import ForkserverExecutor

def probe():
    # A module nothing here imports on its own: present in the task only if it was preloaded.
    sys.exit(0 if "xml.dom.minidom" in sys.modules else 3)

if __name__ == "__main__":
    executor = ForkserverExecutor(preload=tuple(sys.argv[1:]))
    proc = executor._ctx.Process(target=probe)
    proc.start()
    proc.join(timeout=60)
    executor.close()
    sys.exit(proc.exitcode)
"""


@pytest.mark.parametrize(("preload", "code"), [(["xml.dom.minidom"], 0), ([], 3)])
def test_forked_tasks_start_with_the_preloaded_modules(tmp_path: Path, preload, code) -> None:
    # One forkserver per process (multiprocessing's): each case gets a fresh interpreter.
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), *preload], env=env, timeout=120)
    assert proc.returncode == code


def test_only_clientapp_tasks_are_taken() -> None:
    executor = ForkserverExecutor(preload=())
    try:
        types, _ = executor.get_eligible_capacity({TaskType.SERVER_APP, TaskType.CLIENT_APP})
        assert types == {TaskType.CLIENT_APP}
        result = executor.launch(_spec(TaskType.SERVER_APP))
        assert result.status == LaunchResultStatus.FAILED and "ClientApp" in str(result.message)
        assert executor.running == []
    finally:
        executor.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"insecure": True, "root_certificates": Path("ca.crt")}, "exclude each other"),
        ({"insecure": True, "poll_s": 0.0}, "--poll-interval"),
        (
            {"insecure": True, "auth_secret_file": Path("/nonexistent/site.superexec")},
            "cannot read",
        ),
    ],
)
def test_bad_settings_are_refused_before_anything_starts(kwargs, message) -> None:
    with pytest.raises(FedtuneError, match=message):
        run_site_exec("127.0.0.1:9094", **kwargs)


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "site.superexec"
    secret.write_bytes(b"")
    with pytest.raises(FedtuneError, match="is empty"):
        run_site_exec("127.0.0.1:9094", insecure=True, auth_secret_file=secret)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:9094", True),
        ("127.0.0.7:9094", True),
        ("localhost:9094", True),
        ("[::1]:9094", True),
        ("10.0.0.5:9094", False),
        ("0.0.0.0:9094", False),
        ("[2001:db8::1]:9094", False),
        ("supernode.example.org:9094", False),
    ],
)
def test_insecure_runtime_api_off_loopback_is_recognized(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_insecure_off_loopback_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    missing = Path("/nonexistent/site.superexec")  # stops the start right after the checks
    with caplog.at_level("WARNING"), pytest.raises(FedtuneError):
        run_site_exec("10.0.0.5:9094", insecure=True, auth_secret_file=missing)
    assert "clear text" in caplog.text and "10.0.0.5:9094" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(FedtuneError):
        run_site_exec("127.0.0.1:9094", insecure=True, auth_secret_file=missing)
    assert "clear text" not in caplog.text
