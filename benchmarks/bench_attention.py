"""Eager against SDPA attention, one training step (forward + backward) at each padded length.

    python benchmarks/bench_attention.py [--reps 5] [--threads 1] [--out benchmarks/attention.json]

The measurement behind ``model.attention: auto`` (:mod:`sfedlora.lora.attention`): the main
job's model (MiniLM, LoRA r 8 on query/value, batch 16) and the causal-LM demo's (tiny LLaMA,
LoRA on attention and MLP, batch 8), both built as a run builds them, in fp32 and bf16
autocast, at padded lengths from 16 to 1024 tokens. Each row pads a quarter of its batch by
a few tokens, so the attention mask is a real one. The two implementations alternate rep by
rep, so a busy machine slows both alike; the ratio is what the rule uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from sfedlora.config import load_config
from sfedlora.data import load_task
from sfedlora.federated.shared import build_shared

# job → (its config, rows per batch, padded lengths)
JOBS = {
    "minilm": (None, 16, (16, 32, 64, 128, 256, 512)),
    "tiny-llama": ("configs/demo/gsm8k-tiny-llama.yaml", 8, (64, 128, 256, 512, 1024)),
}


def shared_for(job: str, precision: str):
    cfg = load_config(JOBS[job][0], [f"model.precision={precision}", "model.max_length=1024"])
    return build_shared(cfg, load_task(cfg.data, seed=0))


def batch_of(shared, rows: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(100, shared.tokenizer.vocab_size, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    for i in range(0, rows, 4):  # a quarter of the rows a few tokens shorter: a real mask
        mask[i, length - 1 - i % 7 :] = 0
    labels = torch.zeros(rows, dtype=torch.long) if shared.task.has_head else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step_seconds(shared, batch) -> float:
    start = time.perf_counter()
    loss = shared.task.loss(shared.model, dict(batch), shared.compute)
    loss.backward()
    shared.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for job in args.jobs.split(","):
        _, batch_rows, lengths = JOBS[job]
        for precision in args.precisions.split(","):
            shared = shared_for(job, precision)
            shared.model.train()
            for p in shared.params.values():
                p.requires_grad_(True)
            for length in lengths:
                batch = batch_of(shared, batch_rows, length)
                times: dict[str, list[float]] = {"eager": [], "sdpa": []}
                for rep in range(args.reps + 1):
                    for impl in ("eager", "sdpa") if rep % 2 else ("sdpa", "eager"):
                        shared.compute = dataclasses.replace(shared.compute, attention=impl)
                        t = step_seconds(shared, batch)
                        if rep:  # the first is a warm-up
                            times[impl].append(t)
                eager, sdpa = (statistics.median(times[k]) * 1e3 for k in ("eager", "sdpa"))
                row = dict(
                    job=job, precision=precision, length=length, rows=batch_rows, eager_ms=eager, sdpa_ms=sdpa
                )
                rows.append(row)
                print(
                    f"{job:10s} {precision} L={length:5d} x{batch_rows}: eager {eager:8.1f} ms, "
                    f"sdpa {sdpa:8.1f} ms, sdpa/eager {sdpa / eager:.2f}",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "reps": args.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
