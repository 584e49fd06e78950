"""Rehearse a deployment on one machine: SuperLink + N SuperNodes on 127.0.0.1, then `flwr run`.

The same commands deploy/README.md gives the coordinator and the sites, started as real processes
on loopback with TLS and node authentication (or, with ``--insecure``, without either: a loud
warning, for benchmarks only). Every process started here, and every process those start (Flower
detaches its SuperExec, ServerApp and ClientApp processes), carries a tag in its environment; on
exit all of them are stopped by PID: terminate, wait, kill.

    .venv/bin/python deploy/loopback.py --scenario simulations/scenarios/tiny.toml --out runs/loop

Used by tests/e2e/test_deploy.py and bench/deploy_overhead.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cli import superlink
from cli.superlink import free_port

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout

logger = logging.getLogger(__name__)
TAG_ENV = "FEDTUNE_LOOPBACK_TAG"
FEDERATION = "fedtune-loopback"
INSECURE_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!!  INSECURE MODE: no TLS, no node authentication. Anyone who can reach the SuperLink\n"
    "!!  can join the federation and read every update. Loopback benchmarks only.\n" + "!" * 78
)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``TAG_ENV=tag`` (Linux /proc)."""
    return superlink.tagged_pids(tag, TAG_ENV)


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class LoopbackFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 under ``workdir``; a context manager."""

    workdir: Path
    secure: bool = True
    app_dir: Path = ROOT
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: list[Started] = field(default_factory=list)
    port: int = 0
    ca_cert: Path | None = None
    warm: bool = True
    superlink: Started | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            TAG_ENV: self.tag,
        }
        if not self.secure:
            logger.warning(INSECURE_WARNING)

    # -- processes ---------------------------------------------------------------------------
    def spawn(self, name: str, cmd: list[str], cwd: Path | None = None) -> Started:
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                cmd, cwd=cwd or self.workdir, env=self.env, stdout=fh, stderr=subprocess.STDOUT
            )
        started = Started(name, proc, log)
        self.started.append(started)
        logger.info("started %s (pid %d)", name, proc.pid)
        return started

    def run_cmd(self, name: str, cmd: list[str], timeout: float, cwd: Path | None = None) -> str:
        """Run ``cmd`` to completion (tagged, logged); returns its output; raises on failure."""
        started = self.spawn(name, cmd, cwd)
        try:
            rc = started.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"`{' '.join(cmd)}` ran over {timeout:.0f} s") from None
        if rc != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({rc}):\n{started.text()[-3000:]}")
        return started.text()

    def start_superlink(
        self, ca_cert: Path | None, cert: Path | None, key: Path | None, restart: bool = False
    ) -> int:
        """Coordinator: `flower-superlink` with TLS and `--enable-supernode-auth` (or insecure).

        ``restart`` starts it again on the same port and database (allow-list and node ids kept),
        as a coordinator does after a crash; connected SuperNodes reconnect by themselves.
        """
        if not restart:
            self.port = free_port()
        cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--database", str(self.workdir / "superlink.db")]
        cmd += ["--disable-runtime-dependency-installation"]
        if self.secure:
            if not (ca_cert and cert and key):
                raise ValueError("secure mode needs the CA certificate, server certificate and key")
            self.ca_cert = ca_cert
            cmd += ["--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(cert)]
            cmd += ["--ssl-keyfile", str(key), "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        started = self.spawn("superlink-restarted" if restart else "superlink", cmd)
        self.superlink = started
        wait_for_port(self.port, started.proc, timeout=90)
        self._write_flwr_config()
        return self.port

    def _write_flwr_config(self) -> None:
        lines = ["[superlink]", f'default = "{FEDERATION}"', "", f"[superlink.{FEDERATION}]"]
        lines.append(f'address = "127.0.0.1:{self.port}"')
        if self.secure and self.ca_cert:
            lines.append(f'root-certificates = "{self.ca_cert}"')
        else:
            lines.append("insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def register(self, public_keys: list[Path], timeout: float = 120) -> None:
        """Coordinator: put site keys on the allow-list (`flwr supernode register`), in parallel."""
        procs = [
            self.spawn(f"register-{p.stem}", ["flwr", "supernode", "register", str(p), FEDERATION])
            for p in public_keys
        ]
        for s in procs:
            if s.proc.wait(timeout=timeout) != 0:
                raise RuntimeError(f"registering {s.name} failed:\n{s.text()[-2000:]}")

    def identity(self, name: str) -> str:
        """Node config naming site ``name``'s identity for secure aggregation (its key and
        certificate, and the identity CA it trusts): a rehearsal plays the consortium's CA too."""
        from common.identity.certs import init_identity_ca, site_keys

        folder = self.workdir / "identities"
        ca_key, ca_cert = folder / "identity-ca.key", folder / "identity-ca.crt"
        if not ca_cert.is_file():
            init_identity_ca(folder)
        key, cert = folder / name / f"{name}.identity.key", folder / name / f"{name}.identity.crt"
        if not cert.is_file():  # a site restarted in the same rehearsal keeps its identity
            site_keys(folder / name, name, ca_key, ca_cert)
        return f"identity-key='{key}' identity-cert='{cert}' ca-cert='{ca_cert}'"

    def start_supernode(
        self,
        name: str,
        data_dir: Path | None,
        key: Path | None = None,
        root_cert: Path | None = None,
        extra: list[str] | None = None,
        warm: bool | None = None,
    ) -> Started:
        """Site: `flower-supernode` with its node key and the CA certificate (or insecure).

        With ``warm`` (the federation's default: on) the SuperNode runs in ``--isolation process``
        and the site's `fedtune site-exec` starts its ClientApp tasks from a forkserver that
        imported torch, transformers and peft once; otherwise Flower starts a fresh
        `flwr-clientapp` per message.
        """
        runtime = f"127.0.0.1:{free_port()}"
        host, port = runtime.split(":")
        cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}"]
        cmd += ["--host", host, "--port", port]
        if self.secure:
            if root_cert is not None:
                cmd += ["--root-certificates", str(root_cert)]
            if key is not None:
                cmd += ["--auth-supernode-private-key", str(key)]
        else:
            cmd += ["--insecure"]
        if data_dir is not None:
            node_config = f"data-dir='{data_dir}' site-name='{name}' {self.identity(name)}"
            cmd += ["--node-config", node_config]
        if not (self.warm if warm is None else warm):
            return self.spawn(f"supernode-{name}", cmd + list(extra or []))
        # The SuperNode and its SuperExec share a secret: no other local process can take tasks.
        # `fedtune certs site` writes it beside the node key; insecure runs get a throwaway one.
        secret = key.with_suffix(".superexec") if key is not None else Path()
        if not secret.is_file():
            secret = self.workdir / "secrets" / f"{name}.superexec"
            secret.parent.mkdir(mode=0o700, exist_ok=True)
            secret.touch(mode=0o600)
            secret.write_bytes(os.urandom(32).hex().encode())
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        node = self.spawn(f"supernode-{name}", cmd + list(extra or []))
        exec_cmd = ["fedtune", "site-exec", "--runtime-api-address", runtime, "--insecure"]
        exec_cmd += ["--superexec-auth-secret-file", str(secret)]
        self.spawn(f"site-exec-{name}", exec_cmd)
        return node

    def flwr_run_cmd(self, run_config: dict[str, Any]) -> list[str]:
        """ML engineer: `flwr run <app> <federation> --run-config FILE --stream`."""
        import tomli_w

        path = self.workdir / "run-config.toml"
        path.write_text(tomli_w.dumps(run_config), encoding="utf-8")
        return ["flwr", "run", str(self.app_dir), FEDERATION, "--run-config", str(path), "--stream"]

    def flwr_run(self, run_config: dict[str, Any], timeout: float) -> str:
        return self.run_cmd("flwr-run", self.flwr_run_cmd(run_config), timeout, cwd=self.app_dir)

    def nodes(self) -> list[dict[str, Any]]:
        out = self.run_cmd(
            "supernode-ls", ["flwr", "supernode", "ls", FEDERATION, "--format", "json"], 60
        )
        start = out.find("{")
        data = json.loads(out[start:]) if start >= 0 else {}
        return list(data.get("nodes", []))

    # -- teardown ----------------------------------------------------------------------------
    def close(self, grace: float = 8.0) -> None:
        """Stop everything started here and everything it started: terminate, wait, kill."""
        live = [s.proc for s in self.started if s.proc.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in live:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = tagged_pids(self.tag)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            if pids and sig == signal.SIGTERM:
                time.sleep(1.0)
        deadline = time.monotonic() + 5.0
        while (left := tagged_pids(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            logger.warning("process %d still alive after SIGKILL", pid)

    def kill_tree(self, root: Started) -> list[int]:
        """SIGKILL ``root`` and every process it started, all at once (a machine-crash stand-in)."""
        parents: dict[int, int] = {}
        for pid in tagged_pids(self.tag):
            with contextlib.suppress(OSError):
                stat = (Path("/proc") / str(pid) / "stat").read_text()
                parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        tree, grew = {root.proc.pid}, True
        while grew:
            grew = False
            for pid, ppid in parents.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        root.proc.wait()
        return sorted(tree)

    def leftover(self) -> list[int]:
        """Tagged processes still alive (empty after :meth:`close`)."""
        return tagged_pids(self.tag)

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- site data --------------------------------------------------------------------------------
def prepare_sites(scenario: Path, out: Path, overrides: list[str] | None = None) -> list[str]:
    """Write the scenario's virtual sites to ``out/sites/site-<i>`` and ``out/test``.

    Returns the run-config overrides a deployment needs to match ``fedtune simulate`` on the same
    scenario: labels and prompt (resolved from the corpus) and the held-out test folder.
    """
    from common.core.config import load_config
    from simulations.run import prepare

    cfg = prepare(load_config(scenario, overrides or []), out)
    return [
        *(overrides or []),
        f"data.labels={json.dumps(list(cfg.data.labels))}",
        f"data.prompt={json.dumps(cfg.data.prompt_template)}",
        f"evaluation.test_dir={json.dumps(str(cfg.evaluation.test_dir))}",
    ]


def rehearse(scenario: Path, out: Path, workdir: Path, secure: bool, timeout: float) -> Path:
    """Certificates, keys, SuperLink, allow-list, one SuperNode per site, `flwr run`."""
    # The processes run in the federation folder: every path they are given must be absolute.
    scenario, out, workdir = scenario.resolve(), out.resolve(), workdir.resolve()
    from common.core.config import load_config
    from common.identity.certs import init_ca, site_keys

    sites = load_config(scenario).simulation.partition.num_sites
    overrides = prepare_sites(scenario, workdir / "data")
    with LoopbackFederation(workdir, secure=secure) as fed:
        names = [f"site-{i}" for i in range(sites)]
        keys = {}
        if secure:
            ca = init_ca(workdir / "certs", [], [])
            keys = {n: site_keys(workdir / "keys", n) for n in names}
            fed.start_superlink(ca.ca_cert, ca.server_cert, ca.server_key)
            fed.register([k.public_key for k in keys.values()])
        else:
            fed.start_superlink(None, None, None)
        for n in names:
            key = keys[n].private_key if secure else None
            fed.start_supernode(n, workdir / "data" / "sites" / n, key, fed.ca_cert)
        run_config = {
            "scenario": str(scenario.resolve()),
            "out": str(out.resolve()),
            "overrides": ";".join(overrides),
            "simulate-sites": False,  # real sites hold the data; the coordinator writes none
        }
        fed.flwr_run(run_config, timeout)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "simulations/scenarios/tiny.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/loopback")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node auth (bench)")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    workdir = args.workdir or args.out.with_name(args.out.name + "-federation")
    rehearse(args.scenario, args.out, workdir, not args.insecure, args.timeout)
    print(f"run folder: {args.out}")


if __name__ == "__main__":
    main()
