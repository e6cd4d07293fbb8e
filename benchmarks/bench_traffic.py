"""Bytes down per sampled client per round of the methods that change the base, on MiniLM
(LoRA r = 8 on query and value), N = 20: as sent now (the base change as each node catches up
on it, the round record's ``bytes_down``) and as sent before the catch-up (the whole ΔW in
every download), counted side by side in one run.

    python benchmarks/bench_traffic.py [--rounds 5] [--out benchmarks/traffic.json]

Counts, not timings: each (method, clients a round) runs ``--rounds`` rounds of one local
step on the embedded simulator and averages over rounds 2 onwards (round 1 has no ΔW yet).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sfedlora.config import build_config
from sfedlora.data import load_task
from sfedlora.engine.simulator import run_round
from sfedlora.federated.catchup import nbytes
from sfedlora.federated.federation import build_federation
from sfedlora.federated.kinds import split_base

SETTINGS = [
    "data.max_train_examples=400",
    "model.max_length=32",
    "federation.n_clients=20",
    "federation.local_steps=1",
    "partition.min_size=8",
    "train.batch_size=4",
    "lora.rank=8",
    "train.lr=0.01",
]


def traffic(method: str, per_round: int, rounds: int, out_dir: str) -> dict:
    cfg = build_config(
        overrides=[
            *SETTINGS,
            f"method={method}",
            f"federation.clients_per_round={per_round}",
            f"output_dir={out_dir}",
        ]
    )
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    adapter = nbytes(split_base(fed.download(0))[0])  # one rank: the same for every client
    now, before = [], []
    for round_ in range(1, rounds + 1):
        whole = nbytes(split_base(fed.server)[1])
        record = run_round(fed)
        if round_ > 1:
            now.append(record["bytes_down"] / per_round)
            before.append(adapter + whole)
    return {
        "method": method,
        "clients_per_round": per_round,
        "adapter_bytes": adapter,
        "before_bytes": sum(before) / len(before),
        "now_bytes": sum(now) / len(now),
        "now_per_round": now,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "traffic.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            traffic(method, k, args.rounds, tmp)
            for method in ("flora", "fedex-lora", "flexlora")
            for k in (20, 10)
        ]
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['method']:11s} K={r['clients_per_round']:2d}: before {r['before_bytes'] / 1e6:.3f} MB, "
            f"now {r['now_bytes'] / 1e6:.3f} MB per client per round"
        )


if __name__ == "__main__":
    main()
