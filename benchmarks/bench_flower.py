"""Flower's simulation engine against the embedded simulator, side by side in one run.

    python benchmarks/bench_flower.py [--clients 10] [--steps 10] [--rounds 3]
        [--out benchmarks/flower_results.json]

Same job in both: MiniLM, the bundled SST-2 sample, LoRA r = 16, batch 16, sfed-lora,
one warm-up round then ``--rounds`` timed rounds (evaluation only after the last, on 64
dev sentences, outside the round times). Reports the mean seconds per timed round (the
rounds' own ``seconds``: sampling, training, replies, aggregation) and the wall time from
the call to the end of round 1 (model loading, and for Flower starting Ray and its
workers, included).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sfedlora.config import build_config
from sfedlora.driver.experiment import run
from sfedlora.flower.engine import run_simulation


def measure(runner, cfg) -> dict:
    start = time.perf_counter()
    first: dict = {}

    def on_record(record):
        first.setdefault("end_of_round_1", time.perf_counter() - start)

    result = runner(cfg, on_record=on_record)
    timed = [r["seconds"] for r in result.records[1:]]
    return {
        "s_per_round": sum(timed) / len(timed),
        "end_of_round_1_s": first["end_of_round_1"],
        "train_loss_last": result.records[-1]["train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("flower_results.json")))
    args = parser.parse_args()
    out_dir = tempfile.mkdtemp(prefix="bench-flower-")
    overrides = [
        "lora.rank=16",
        "train.batch_size=16",
        "method=sfed-lora",
        "partition.min_size=16",
        f"federation.n_clients={args.clients}",
        f"federation.local_steps={args.steps}",
        f"federation.rounds={args.rounds + 1}",
        "eval.every=1000",
        "data.max_eval_examples=64",
        f"output_dir={out_dir}",
        "save_adapters=false",
    ]
    results = {
        "job": f"N={args.clients} x {args.steps} steps, {args.rounds} timed rounds after 1 warm-up",
        "embedded": measure(
            lambda cfg, on_record: run(cfg, on_record=on_record),
            build_config(overrides=[*overrides, "name=embedded"]),
        ),
        "flower_simulation": measure(
            lambda cfg, on_record: run_simulation(cfg, on_record=on_record),
            build_config(overrides=[*overrides, "name=flower"]),
        ),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    results["flower_over_embedded"] = (
        results["flower_simulation"]["s_per_round"] / results["embedded"]["s_per_round"]
    )
    print(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
