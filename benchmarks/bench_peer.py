"""This project's round against the client FlowerTune and OpenFedLLM write, side by side in one run.

    python benchmarks/bench_peer.py [--clients 10] [--steps 10] [--rounds 4] [--out peer.json]

The job: MiniLM on the bundled SST-2 sample split IID over N clients, LoRA r 8 on query and
value (γ = 16·√(N/8)), batch 16, AdamW at 5e-4 built afresh each round, bf16 autocast where
the CPU has it, FedSA aggregation (A averaged, B kept per client). The peer builds, per
client per round, a PEFT model's state and a ``transformers.Trainer`` (``max_steps`` local
steps) over one shared PEFT model, as FlowerTune's LLM apps (TRL's SFTTrainer is a Trainer)
and OpenFedLLM's ``main_sft.py`` do. This project's round runs through the embedded
simulator in one process at 1 torch thread each way (workers off: the peer has none), once
with ``model.attention=sdpa`` (the transformers default, the path before the measured rule),
once with ``auto``, and with ``auto`` through the fused engine. The four alternate round by
round, so load from other processes hits them alike; the median of rounds 2 onwards is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time

import torch

from sfedlora.config import build_config
from sfedlora.data import load_task
from sfedlora.engine.executors import Fused
from sfedlora.engine.simulator import run_round
from sfedlora.federated.federation import build_federation
from sfedlora.lora.models import Compute, resolve_model_path


class Peer:
    """The Trainer-per-client round over one shared PEFT model."""

    def __init__(self, fed, n: int, steps: int):
        from datasets import Dataset
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

        path = resolve_model_path("minilm")
        self.tok = AutoTokenizer.from_pretrained(path)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        lora = LoraConfig(
            r=8,
            lora_alpha=16 * math.sqrt(n),
            use_rslora=True,
            target_modules=["query", "value"],
            lora_dropout=0.0,
            modules_to_save=["classifier", "pooler"],
        )
        self.model = get_peft_model(base, lora)
        self.shards = []
        for k in range(n):
            data = fed.client(k).data
            self.shards.append(
                Dataset.from_dict(
                    {
                        "input_ids": [f["input_ids"] for f in data.features],
                        "attention_mask": [[1] * len(f["input_ids"]) for f in data.features],
                        "labels": data.labels.tolist(),
                    }
                )
            )
        self.collate = DataCollatorWithPadding(self.tok)
        self.steps, self.bf16 = steps, Compute.resolve("cpu", "auto").precision == "bf16"
        self.glob = {k: v.clone() for k, v in get_peft_model_state_dict(self.model).items()}
        self.local_b: dict[int, dict] = {}
        self.round = 0

    def run_round(self) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from transformers import Trainer, TrainingArguments

        outs = []
        for k, shard in enumerate(self.shards):
            set_peft_model_state_dict(self.model, {**self.glob, **self.local_b.get(k, {})})
            args = TrainingArguments(
                output_dir=tempfile.gettempdir(),
                max_steps=self.steps,
                per_device_train_batch_size=16,
                learning_rate=5e-4,
                lr_scheduler_type="constant",
                weight_decay=0.0,
                bf16=self.bf16,
                use_cpu=True,
                report_to=[],
                save_strategy="no",
                logging_strategy="no",
                disable_tqdm=True,
                seed=self.round * len(self.shards) + k,
                dataloader_num_workers=0,
            )
            Trainer(model=self.model, args=args, train_dataset=shard, data_collator=self.collate).train()
            new = {n: v.detach().clone() for n, v in get_peft_model_state_dict(self.model).items()}
            self.local_b[k] = {n: v for n, v in new.items() if "lora_B" in n}
            outs.append((len(shard), new))
        total = sum(n for n, _ in outs)
        for name in self.glob:
            if "lora_B" not in name:
                self.glob[name] = sum(n * o[name] for n, o in outs) / total
        self.round += 1


def federation(n: int, steps: int, attention: str, engine: str = "per-client"):
    cfg = build_config(
        overrides=[
            f"federation.n_clients={n}",
            f"federation.local_steps={steps}",
            "federation.rounds=1000",
            "eval.every=1000",
            "simulator.workers=1",
            f"simulator.engine={engine}",
            f"model.attention={attention}",
        ]
    )
    return build_federation(cfg, load_task(cfg.data, seed=0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    feds = {a: federation(args.clients, args.steps, a) for a in ("sdpa", "auto")}
    fused = federation(args.clients, args.steps, "auto", "fused")
    sides = {
        "peer (PEFT + Trainer per client per round)": Peer(feds["sdpa"], args.clients, args.steps).run_round,
        "sfedlora, model.attention=sdpa (before)": lambda: run_round(feds["sdpa"]),
        "sfedlora, model.attention=auto": lambda: run_round(feds["auto"]),
        "sfedlora, fused engine, attention=auto": lambda: run_round(fused, Fused(fused)),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, step in sides.items() if r % 2 else reversed(sides.items()):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    med = {name: statistics.median(t[1:]) for name, t in times.items()}
    peer, before, now, fused_now = med.values()
    print(f"N = {args.clients} x {args.steps} steps, 1 thread, median of rounds 2-{args.rounds}:")
    for name, m in med.items():
        print(f"  {name:45s} {m:7.2f} s/round")
    print(f"  peer / sfedlora(auto) {peer / now:.2f}x; sfedlora sdpa / auto {before / now:.2f}x")
    print(
        f"  peer / sfedlora(fused) {peer / fused_now:.2f}x; sfedlora sdpa / fused {before / fused_now:.2f}x"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"clients": args.clients, "steps": args.steps, "rounds": times, "median": med}, f, indent=1
            )


if __name__ == "__main__":
    main()
