"""How close a local step comes to this CPU's matmul limit.

    python benchmarks/bench_limit.py [--threads 1] [--clients 4] [--attention auto,sdpa]

For the main job's step (MiniLM, SST-2 sample, r 8 on query/value, batch 16, AdamW, bf16
autocast where the CPU has it) and the causal-LM demo's (configs/demo/gsm8k-tiny-llama.yaml),
each built as a run builds it: the FLOPs of whole client rounds (torch's FlopCounterMode,
through the project's own client_round), their time, the achieved GFLOP/s, and its ratio
to this machine's GEMM throughput measured in the same script at the step's dominant
shape (padded tokens x hidden x MLP width, the precision of the step) and at 2048^3. One
torch thread: a run's client workers take one each. With several ``--attention`` values
the settings alternate client by client, so load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from sfedlora.config import load_config
from sfedlora.data import load_task
from sfedlora.federated.client import LocalRound, client_round
from sfedlora.federated.federation import build_federation

JOBS = {
    "minilm": None,
    "tiny-llama": "configs/demo/gsm8k-tiny-llama.yaml",
}  # the main job, the causal-LM demo


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def client_seconds(fed, k: int, attention: str) -> float:
    """Client ``k``'s first round with ``model.attention`` = ``attention``, in seconds."""
    fed.compute = dataclasses.replace(fed.compute, attention=attention)
    start = time.perf_counter()
    client_round(fed, fed.client(k), fed.clients[k], fed.download(k), 1)
    return time.perf_counter() - start


def probe(job: str, path: str | None, clients: int, settings: list[str], threads: int) -> None:
    cfg = load_config(path, ["simulator.workers=1"])
    fed = build_federation(cfg, load_task(cfg.data, seed=0))
    base = fed.model.get_base_model().config
    dtype = fed.compute.dtype if fed.compute.precision != "fp32" else torch.float32
    ks = list(range(min(clients, len(fed.clients))))
    tokens = [
        len(idx) * int(fed.client(k).data.lengths()[idx].max())
        for k in ks
        for idx in LocalRound(fed, fed.client(k), fed.clients[k], {}).batches
    ]
    client_seconds(fed, 0, settings[0])  # warm-up
    flops = {}
    for s in settings:
        with FlopCounterMode(display=False) as counter:
            for k in ks:
                client_seconds(fed, k, s)
        flops[s] = counter.get_total_flops()
    times: dict[str, list[float]] = {s: [0.0] * len(ks) for s in settings}
    for i, k in enumerate(ks):
        for s in settings if i % 2 else settings[::-1]:
            times[s][i] = client_seconds(fed, k, s)
    steps, shape = len(tokens), (int(np.mean(tokens)), base.hidden_size, base.intermediate_size)
    own, big = gemm_gflops(*shape, dtype), gemm_gflops(2048, 2048, 2048, dtype)
    print(
        f"{job}: {steps} steps of {np.mean(tokens):.0f} padded tokens, {fed.compute.precision}, {threads} "
        f"thread(s); GEMM {shape[0]}x{shape[1]}x{shape[2]} {own:.1f} GFLOP/s, 2048^3 {big:.1f} GFLOP/s"
    )
    for s in settings:
        total = sum(times[s])
        achieved = flops[s] / total / 1e9
        print(
            f"  attention={s:5s} step {total / steps * 1e3:7.1f} ms, {flops[s] / steps / 1e9:6.2f} "
            f"GFLOP/step, {achieved:6.1f} GFLOP/s = {achieved / own:.0%} of the own-shape GEMM, "
            f"{achieved / big:.0%} of 2048^3 (client round median {statistics.median(times[s]):.2f} s)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clients", type=int, default=4, help="client rounds timed per setting")
    ap.add_argument("--attention", default="auto,sdpa")
    ap.add_argument("--jobs", default=",".join(JOBS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for job in args.jobs.split(","):
        probe(job, JOBS[job], args.clients, args.attention.split(","), args.threads)


if __name__ == "__main__":
    main()
