"""Simulator speed and memory, measured side by side in one run.

    python benchmarks/bench_simulator.py [--rounds 3] [--out benchmarks/results.json]

Same job everywhere: MiniLM, the bundled SST-2 sample, LoRA r = 16 on query/value, batch
16, sfed-lora. Reports, after one warm-up round each:
- rounds/s and training examples/s of the embedded simulator, in one process and with
  its client workers (one per torch thread), and of a naive simulator that deep-copies
  the PEFT model for every client, at N = 10 x 10 local steps and N = 100 x 1 step;
- the overhead of one federated round against the same steps (the same clients' batches)
  as a plain PEFT training loop on one model with one optimizer (ratio);
- personalised evaluation of 10 clients against evaluating one model (ratio), in one
  process and with the workers;
- peak resident memory of a one-round run at N = 1, 10, 100, each in its own process
  (one process: the workers' memory is measured apart, as proportional set size, since
  they share the base model's pages with the parent), and of N = 1 taking 100 local
  steps: as many batches as N = 100 x 1 step, so the difference is the clients' state.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from sfedlora.config import build_config
from sfedlora.data import load_task
from sfedlora.engine.simulator import run_round
from sfedlora.engine.workers import ClientWorkers
from sfedlora.federated.client import LocalRound, train_client
from sfedlora.federated.evaluation import ScoredHere, evaluate
from sfedlora.federated.federation import build_federation
from sfedlora.federated.methods import aggregate
from sfedlora.lora.models import trainable_parameters
from sfedlora.tasks.sequence import predict

BASE = [
    "lora.rank=16",
    "train.batch_size=16",
    "method=sfed-lora",
    "eval.every=1000",
    "federation.rounds=1000",
]


def federation(n_clients: int, local_steps: int, *extra: str):
    cfg = build_config(
        overrides=[
            *BASE,
            f"federation.n_clients={n_clients}",
            f"federation.local_steps={local_steps}",
            "partition.min_size=16",
            *extra,
        ]
    )
    return build_federation(cfg, load_task(cfg.data, seed=0))


def pss_mb(pids: list[int]) -> float:
    """Proportional set size of these processes together: shared pages counted once."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return total / 1024


def timed_rounds(step, rounds: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(rounds):
        step()
    return (time.perf_counter() - start) / rounds


def naive_round(fed) -> None:
    """What the embedded simulator replaces: a model copy per client, state kept in it."""
    method, round_ = fed.method, fed.round + 1
    updates = []
    for k in range(len(fed.clients)):
        model = copy.deepcopy(fed.model)  # a whole PEFT model per client
        run = LocalRound(fed, fed.client(k), fed.clients[k], fed.download(k))
        train_client(
            model, trainable_parameters(model), run, fed.tokenizer, method.trained(round_), fed.compute
        )
        fed.clients[k] = run.state
        updates.append(method.upload(run.state.tensors, round_))
        del model
    fed.server.update(aggregate(updates, fed.client_sizes.tolist()))
    fed.round = round_


def plain_loop(fed) -> None:
    """One round's training steps (every client's batches, drawn as the simulator draws them)
    as a plain PEFT loop: one model, one optimizer, no state swapped in or out."""
    from sfedlora.data.encoding import collate
    from sfedlora.federated.client import make_optimizer

    params = list(fed.params.values())
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer(params, fed.cfg.train)
    fed.model.train()
    for k, data in enumerate(fed.client_data):
        for idx in LocalRound(fed, fed.client(k), fed.clients[k], {}).batches:
            loss = fed.compute.forward(fed.model, collate(data, idx, fed.tokenizer)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)


def peak_rss_mb(n_clients: int, local_steps: int = 1) -> float:
    overrides = BASE + [
        f"federation.n_clients={n_clients}",
        f"federation.local_steps={local_steps}",
        "partition.min_size=16",
    ]
    code = (
        "import sys; sys.argv=['x'];"
        "from sfedlora.config import build_config; from sfedlora.data import load_task;"
        "from sfedlora.federated.federation import build_federation;"
        "from sfedlora.engine.simulator import run_round;"
        f"cfg = build_config(overrides={overrides!r});"
        "fed = build_federation(cfg, load_task(cfg.data)); run_round(fed);"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
        "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    results: dict = {"machine": f"{platform.machine()}, {threads} torch threads, torch {torch.__version__}"}

    for n, steps in [(10, 10), (100, 1)]:
        fed = federation(n, steps)
        workers = ClientWorkers(fed, threads)
        examples = n * steps * fed.cfg.train.batch_size
        sim = timed_rounds(partial(run_round, fed), args.rounds)
        par = timed_rounds(partial(run_round, fed, workers), args.rounds)
        fed_naive = federation(n, steps)
        naive = timed_rounds(partial(naive_round, fed_naive), args.rounds)
        plain = timed_rounds(partial(plain_loop, fed), args.rounds)
        results[f"N={n}x{steps}"] = {
            "embedded_s_per_round": sim,
            "embedded_examples_per_s": examples / sim,
            f"embedded_{threads}_workers_s_per_round": par,
            "workers_examples_per_s": examples / par,
            "workers_speedup": sim / par,
            "naive_copy_s_per_round": naive,
            "speedup_vs_naive": naive / sim,
            "plain_loop_s": plain,
            "overhead_ratio": sim / plain,
            "workers_over_plain_loop": par / plain,
            "pss_mb_parent_and_workers": pss_mb([os.getpid(), *workers.pids()]),
        }
        if (n, steps) == (10, 10):
            start = time.perf_counter()
            predict(fed.model, fed.eval_data, fed.tokenizer, fed.cfg.eval.batch_size, fed.compute)
            one = time.perf_counter() - start
            personal = {}
            for name, w in [("one_process", None), (f"{threads}_workers", workers)]:
                start = time.perf_counter()
                evaluate(fed, ScoredHere(w))
                personal[name] = time.perf_counter() - start
            results["evaluation"] = {
                "one_model_s": one,
                **{f"personalised_10_clients_{name}_s": t for name, t in personal.items()},
                **{f"ratio_{name}": t / one for name, t in personal.items()},
            }
        workers.close()

    results["peak_rss_mb"] = {f"N={n}": peak_rss_mb(n) for n in (1, 10, 100)}
    # The same number of batches as N = 100 x 1 step, from one client: what the compute
    # itself holds (the largest batch's activations, kernels cached per batch shape).
    results["peak_rss_mb"]["N=1 x 100 steps"] = peak_rss_mb(1, 100)
    fed = federation(1, 1)
    one_client = sum(t.numel() * t.element_size() for t in fed.clients[0].tensors.values())
    results["peak_rss_mb"]["one_client_state_mb (adapter only, before optimizer state)"] = one_client / 2**20

    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
