"""The round engines side by side in one run: fused, per-client (one process, worker
processes) and Flower's simulation engine, over N clients x E local steps.

    python benchmarks/bench_engines.py [--workloads 10x1,10x10,100x1,100x10,1000x1,1000x10]
        [--out benchmarks/engines.json]

Job: MiniLM, real SST-2 from ../shared/data (IID, 40 sentences per client, at least 4,000),
LoRA r = 16 on query/value, batch 16, sfed-lora, bf16 autocast where the CPU has it (as
``precision: auto``), evaluation only after the last round on 64 dev sentences (outside the
round times). Every engine of a workload runs the same rounds one after the other in this
process run: a warm-up round, then timed ones. Reports seconds per timed round (each
round's own ``seconds``), examples per second and the wall time from the call to the end
of round 1 (model loading, and for Flower starting Ray and its workers, included).
Results are appended workload by workload, so a stopped run keeps what it measured.
Peak memory: ``--memory N`` runs one fused round of N x 1 step in this (fresh) process
and prints its peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sfedlora.config import build_config
from sfedlora.driver.experiment import run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "sst2"
# A workload's rounds after one warm-up round (none at N = 1000: its first round is timed),
# fewer where a round is long, so the table fits an afternoon.
TIMED = {"10x1": 3, "10x10": 5, "100x1": 2, "100x10": 1, "1000x1": 0, "1000x10": 0}
ENGINES = {
    "fused": ["simulator.engine=fused", "simulator.workers=1"],
    "fused_2_workers": ["simulator.engine=fused", "simulator.workers=2"],
    "per_client_1_process": ["simulator.engine=per-client", "simulator.workers=1"],
    "per_client_2_workers": ["simulator.engine=per-client", "simulator.workers=2"],
    "flower_simulation": ["simulator.engine=per-client"],
}


def overrides(n: int, steps: int, rounds: int, out_dir: str) -> list[str]:
    return [
        "lora.rank=16",
        "train.batch_size=16",
        "method=sfed-lora",
        "partition.min_size=16",
        "data.source=tsv",
        f"data.data_dir={DATA}",
        f"data.max_train_examples={max(4000, 40 * n)}",
        "data.max_eval_examples=64",
        f"federation.n_clients={n}",
        f"federation.local_steps={steps}",
        f"federation.rounds={rounds}",
        "eval.every=1000",
        "eval.clients=4",
        f"output_dir={out_dir}",
        "save_adapters=false",
    ]


def measure(engine: str, cfg) -> dict:
    start = time.perf_counter()
    first: dict = {}

    def on_record(record):
        first.setdefault("end_of_round_1", time.perf_counter() - start)

    if engine == "flower_simulation":
        from sfedlora.flower.engine import run_simulation

        result = run_simulation(cfg, on_record=on_record)
    else:
        result = run(cfg, on_record=on_record)
    # N = 1000 runs one round: its first, which includes the engine's one-time costs.
    timed = [r["seconds"] for r in result.records[1:]] or [result.records[0]["seconds"]]
    return {
        "s_per_round": sum(timed) / len(timed),
        # A round now and then takes twice as long on this shared machine: the median resists it.
        "s_per_round_median": statistics.median(timed),
        "rounds_s": [r["seconds"] for r in result.records],
        "end_of_round_1_s": first["end_of_round_1"],
        "train_loss_last": result.records[-1]["train_loss"],
    }


def peak_memory(n: int) -> None:
    from sfedlora.data import load_task
    from sfedlora.engine.executors import Fused
    from sfedlora.engine.simulator import run_round
    from sfedlora.federated.federation import build_federation

    cfg = build_config(overrides=[*overrides(n, 1, 1, tempfile.mkdtemp()), "simulator.engine=fused"])
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    run_round(fed, Fused(fed))
    print(
        json.dumps({"clients": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", default="10x1,10x10,100x1,100x10,1000x1,1000x10")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--out", default=str(Path(__file__).with_name("engines.json")))
    parser.add_argument("--memory", type=int, help="print the peak RSS of one fused round of N x 1 step")
    args = parser.parse_args()
    if args.memory:
        return peak_memory(args.memory)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    for workload in args.workloads.split(","):
        n, steps = (int(x) for x in workload.split("x"))
        rounds = 1 + TIMED[workload]
        row = results.setdefault(workload, {})
        for engine in args.engines.split(","):
            if engine in row:
                continue
            cfg = build_config(
                overrides=[
                    *overrides(n, steps, rounds, tempfile.mkdtemp()),
                    *ENGINES[engine],
                    f"name={engine}",
                ]
            )
            row[engine] = measure(engine, cfg)
            row[engine]["examples_per_s"] = n * steps * 16 / row[engine]["s_per_round"]
            print(workload, engine, json.dumps(row[engine]), flush=True)
            out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
