"""Flower's simulation engine in this process: ``sfedlora run --runtime flower``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

from ..config import RunConfig
from ..errors import SfedloraError
from ..experiment import RunResult
from .server_app import check_runnable, make_server_app


def run_simulation(
    cfg: RunConfig, on_start: Callable | None = None, on_record: Callable | None = None
) -> RunResult:
    """Run ``cfg`` as a Flower app on the simulation engine: one virtual SuperNode per
    client, ClientApps in Ray workers, the ServerApp here; the same run directory as
    the embedded simulator."""
    check_runnable(cfg)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a library run should not phone home
    # Ray announces a future default that would let GPU-less actors see the GPUs; we rely
    # on today's (client_gpus=0 keeps a ClientApp off the GPU), so the notice is not ours to act on.
    warnings.filterwarnings(
        "ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning
    )
    from flwr.simulation import run_simulation as flower_simulation

    from .client_app import app as client_app

    outcome: dict = {}
    flower_simulation(
        server_app=make_server_app(cfg, on_start, on_record, outcome),
        client_app=client_app,
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
