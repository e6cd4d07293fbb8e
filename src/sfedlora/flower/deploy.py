"""A Flower deployment on this machine: one SuperLink and a SuperNode per client on
127.0.0.1, TLS with self-signed certificates, SuperNode authentication, one run, then
everything stopped. What ``sfedlora flower up`` does; the README shows the same steps
across machines.

Every process runs in its own session, so stopping it stops the ClientApp/ServerApp
processes it spawned too; each writes its log to ``<workdir>/logs``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ..config import RunConfig, dump_config
from ..driver.experiment import resume_config
from ..driver.rundir import check_run_dir, default_run_name
from ..errors import SfedloraError
from .credentials import make_node_key, make_tls
from .server_app import check_runnable

HOST = "127.0.0.1"
LINK = "sfedlora"  # the SuperLink connection's name in the flwr CLI's config

APP_PYPROJECT = """\
# A Flower app that runs the installed sfedlora package (flwr run builds it into a FAB).
[project]
name = "sfedlora-job"
version = "0.1.0"
description = "sfedlora federated LoRA run"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "sfedlora"

[tool.flwr.app.components]
serverapp = "sfedlora.flower.server_app:app"
clientapp = "sfedlora.flower.client_app:app"

[tool.flwr.app.config]
config = ""
overrides = ""
resume = ""
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _command(tool: str, *flags: str, **options) -> list[str]:
    """``tool`` with ``flags`` and ``--an-option value`` for each option (``an_option=value``)."""
    pairs = [(k if k.startswith("--") else "--" + k.replace("_", "-"), str(v)) for k, v in options.items()]
    return [_tool(tool), *flags, *(x for pair in pairs for x in pair)]


def _tool(name: str) -> str:
    # Prefer the Flower tools installed next to this interpreter (a virtual environment).
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise SfedloraError(f"{name} not found: install Flower with pip install 'flwr[simulation]~=1.42.0'")
    return found


class LocalDeployment:
    """A SuperLink and ``n_clients`` SuperNodes on this machine, stopped on exit. Each SuperNode
    keeps its client's state in ``<workdir>/nodes/<name>`` (node config ``state-dir``) and, with
    ``data_dirs``, trains on the files in ``data_dirs[k]`` (``data-dir``)."""

    def __init__(
        self,
        workdir: Path,
        n_clients: int,
        startup_timeout: float = 120.0,
        data_dirs: dict[int, Path] | None = None,
    ):
        self.workdir = workdir.resolve()
        self.n_clients = n_clients
        self.data_dirs = data_dirs or {}
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            # The app's dependencies are this package's: installed already, never fetched at run time.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }

    def __enter__(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        self.tls = make_tls(self.workdir / "certs", [HOST, "localhost"])
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{LINK}"\n\n[superlink.{LINK}]\naddress = "{HOST}:{self.port}"\n'
            f'root-certificates = "{self.tls.ca_cert}"\n'
        )
        (self.workdir / "app").mkdir(exist_ok=True)
        (self.workdir / "app" / "pyproject.toml").write_text(APP_PYPROJECT)
        tls = {"--ssl-ca-certfile": self.tls.ca_cert, "--ssl-certfile": self.tls.server_cert}
        tls["--ssl-keyfile"] = self.tls.server_key
        flags = ["--enable-supernode-auth", "--disable-runtime-dependency-installation"]
        self.spawn("superlink", _command("flower-superlink", *flags, **tls, host=HOST, port=self.port))
        for k in range(self.n_clients):
            private, public = make_node_key(self.workdir / "keys", f"node-{k}")
            self.register(public)
            self.start_node(k, private)

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_tool("flwr"), *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register(self, public_key: Path) -> None:
        """Authorise a SuperNode's key, retrying while the SuperLink starts."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            done = self.flwr("supernode", "register", str(public_key), LINK)
            if done.returncode == 0:
                return
            if self.processes["superlink"].poll() is not None:
                raise SfedloraError(
                    f"the SuperLink stopped (exit code {self.processes['superlink'].returncode}): "
                    f"see {self.workdir / 'logs' / 'superlink.log'}"
                )
            if time.monotonic() > deadline:
                raise SfedloraError(
                    f"could not register SuperNode key {public_key.name}: {done.stdout.strip()[-300:]} "
                    f"{done.stderr.strip()[-300:]}"
                )
            time.sleep(0.5)

    def start_node(self, k: int, private_key: Path, name: str | None = None) -> subprocess.Popen:
        name = name or f"supernode-{k}"
        node_config = (
            f"partition-id={k} num-partitions={self.n_clients} state-dir='{self.workdir / 'nodes' / name}'"
        )
        if k in self.data_dirs:
            node_config += f" data-dir='{Path(self.data_dirs[k]).resolve()}'"
        return self.spawn(
            name,
            _command(
                "flower-supernode",
                superlink=f"{HOST}:{self.port}",
                root_certificates=self.tls.ca_cert,
                auth_supernode_private_key=private_key,
                port=free_port(),
                node_config=node_config,
            ),
        )

    def submit(self, cfg: RunConfig | None, resume: Path | None = None) -> subprocess.Popen:
        """Start ``cfg``, or resume the run directory ``resume``, on the federation; the returned
        ``flwr run --stream`` exits with the run."""
        settings = f"resume='{resume.resolve()}'" if resume is not None else ""
        if cfg is not None:
            path = self.workdir / "config.yaml"
            path.write_text(dump_config(cfg))
            settings += f" config='{path}'"
        return self.spawn(
            "run",
            [
                _tool("flwr"),
                "run",
                str(self.workdir / "app"),
                LINK,
                "--stream",
                "--run-config",
                settings.strip(),
            ],
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one process and everything it started: at once (a machine that dies), or with
        ``sig`` SIGTERM as its operator would (a SuperNode then signs off from the SuperLink)."""
        proc = self.processes[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process (SuperNodes first), politely, then for good; leave none behind.

        Flower's helpers may start sessions of their own, so the whole tree of processes
        each one started is collected first, and every one of them is waited for.
        """
        order = [n for n in self.processes if n != "superlink"] + [
            n for n in self.processes if n == "superlink"
        ]
        tree = _descendants({self.processes[n].pid for n in order})
        for name in order:
            _signal_group(self.processes[name].pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name in order:
            try:
                self.processes[name].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for name in order:  # whatever the sessions still hold (ClientApp/ServerApp children)
            _signal_group(self.processes[name].pid, signal.SIGKILL)
            self.processes[name].wait()
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # SIGKILL is asynchronous: return once none of them is still running.
        pgids = {p.pid for p in self.processes.values()}
        deadline = time.monotonic() + grace
        while _running(pgids, tree) and time.monotonic() < deadline:
            time.sleep(0.1)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _proc_table() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process; Linux /proc."""
    rows = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        rows.append((int(stat.parent.name), fields[0], int(fields[1]), int(fields[2])))
    return rows


def _descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, _, ppid, _ in _proc_table():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pgids: set[int], pids: set[int]) -> bool:
    """Whether a process of these groups, or one of these pids, is alive (not a zombie)."""
    return any(state != "Z" and (pgid in pgids or pid in pids) for pid, state, _, pgid in _proc_table())


def prepare(cfg: RunConfig) -> RunConfig:
    """``cfg`` with an absolute run directory fixed now: the ServerApp runs elsewhere."""
    check_runnable(cfg)
    tree = cfg.model_dump(mode="json")
    tree["name"] = cfg.name or default_run_name(cfg)
    tree["output_dir"] = str(Path(cfg.output_dir).resolve())
    fixed = RunConfig.model_validate(yaml.safe_load(yaml.safe_dump(tree)))
    check_run_dir(fixed)
    return fixed


def up(
    cfg: RunConfig | None,
    workdir: Path,
    timeout: float = 3600.0,
    on_record: Callable[[dict], None] | None = None,
    resume: Path | None = None,
    data_dirs: dict[int, Path] | None = None,
) -> Path:
    """Run ``cfg`` (or resume the run directory ``resume``) on a fresh local deployment; the
    run directory it wrote. Resuming, use the ``workdir`` of the first start: the SuperNodes'
    states are in it. ``data_dirs``: each client's own data (:class:`LocalDeployment`).

    ``on_record`` gets each round's record as the ServerApp appends it to metrics.jsonl.
    """
    if resume is None:
        cfg = prepare(cfg)
        run_dir = Path(cfg.output_dir) / cfg.name
    else:
        run_dir = resume.resolve()
        cfg = resume_config(run_dir, cfg)
    seen = 0

    def new_records() -> None:
        nonlocal seen
        text = (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").is_file() else ""
        # Only whole lines: the last one may be being written (or torn, by a killed ServerApp).
        for line in text.splitlines(keepends=True)[seen:]:
            if not line.endswith("\n"):
                break
            if on_record is not None:
                on_record(json.loads(line))
            seen += 1

    with LocalDeployment(workdir, cfg.federation.n_clients, data_dirs=data_dirs) as deployment:
        job = deployment.submit(cfg, resume=None if resume is None else run_dir)
        deadline = time.monotonic() + timeout
        while job.poll() is None:
            if time.monotonic() > deadline:
                raise SfedloraError(
                    f"the run did not finish within {timeout:g}s: see the logs in {workdir / 'logs'}"
                )
            new_records()
            time.sleep(1.0)
    new_records()
    if not (run_dir / "summary.json").is_file():
        raise SfedloraError(
            f"the run stopped before it finished: see {workdir / 'logs'} (run.log, superlink.log)"
        )
    return run_dir
