"""Flower's simulation engine in this process: ``sfedlora run --runtime flower``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..driver.experiment import RunResult, resume_config
from ..errors import SfedloraError
from .deploy import prepare
from .server_app import check_runnable, make_server_app

NODES = "nodes"  # in the run directory: each virtual SuperNode's state-dir, nodes/client_KK


@dataclass(frozen=True)
class NodeDisks:
    """A ClientApp mod giving each virtual SuperNode a ``state-dir`` under ``root``, as a real
    SuperNode has one on its own disk: its client's state outlives the simulation, so the run
    can be resumed, and its personalised adapter is saved there."""

    root: str

    def __call__(self, msg, context, call_next):
        k = int(context.node_config["partition-id"])
        context.node_config.setdefault("state-dir", str(Path(self.root) / f"client_{k:02d}"))
        return call_next(msg, context)


def run_simulation(
    cfg: RunConfig | None,
    on_start: Callable | None = None,
    on_record: Callable | None = None,
    resume: str | Path | None = None,
) -> RunResult:
    """Run ``cfg`` (or resume the run directory ``resume``) as a Flower app on the simulation
    engine: one virtual SuperNode per client, ClientApps in Ray workers, the ServerApp here;
    the same run directory as the embedded simulator, plus the nodes' states in ``nodes/``."""
    if resume is not None:
        run_dir = Path(resume).resolve()
        cfg = resume_config(run_dir, cfg)
        check_runnable(cfg)
    else:
        cfg = prepare(cfg)  # the run directory is fixed now: the nodes' state lives in it
        run_dir = Path(cfg.output_dir) / cfg.name
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a library run should not phone home
    # Ray announces a future default that would let GPU-less actors see the GPUs; we rely
    # on today's (client_gpus=0 keeps a ClientApp off the GPU), so the notice is not ours to act on.
    warnings.filterwarnings(
        "ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning
    )
    from flwr.simulation import run_simulation as flower_simulation

    from .client_app import client_app

    outcome: dict = {}
    flower_simulation(
        server_app=make_server_app(
            cfg, on_start, on_record, outcome, resume=None if resume is None else run_dir
        ),
        client_app=client_app(NodeDisks(str(run_dir / NODES))),
        num_supernodes=cfg.federation.n_clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.flower.client_cpus, "num_gpus": cfg.flower.client_gpus}
        },
    )
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise SfedloraError("the Flower simulation stopped before the run finished: see its log above")
    return outcome["result"]
