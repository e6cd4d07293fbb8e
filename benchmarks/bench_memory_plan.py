"""`sfedlora plan` against measured memory: one client's training turn on the CPU.

Each case runs in a fresh process with glibc's mmap threshold fixed at 64 KiB, so that every
large tensor is its own mapping and the resident set (RSS) follows the live tensors. The
federation is built first (model, data, clients); then the peak RSS is reset
(/proc/self/clear_refs) and one client trains its local steps. Measured: that peak minus the
RSS before it. Planned: the plan's activations at the configured micro-batch plus its training
state (adapter, gradients, moments). Examples are long enough to fill model.max_length. The
fused case runs one round of all 10 clients in the fused engine instead; planned: its
activations per micro-batch of simulator.fused_tokens, the stacked adapters with their
gradients and moments, the weights each row gathers, and the copies of the clients' states.

    python benchmarks/bench_memory_plan.py          # prints a markdown table, writes memory_plan.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY_LLAMA = [
    "model.name_or_path=tiny-llama",
    "data.task=gsm8k",
    "train.batch_size=8",
    "model.max_length=512",
]
MINILM = ["data.task=long", "train.batch_size=32", "model.max_length=128"]
FUSED = [
    "simulator.engine=fused",
    "simulator.fused_tokens=2048",
    "federation.n_clients=10",
    "federation.local_steps=1",
]
# (case, overrides, gradient checkpointing)
CASES = [
    ("tiny-llama 8x512", TINY_LLAMA, False),
    ("tiny-llama 8x512", TINY_LLAMA, True),
    ("MiniLM 32x128", MINILM, False),
    ("MiniLM 32x128", MINILM, True),
    ("MiniLM fused, 10 clients x 1 step", [*MINILM, *FUSED], False),
]


def _data(tmp: Path) -> list[str]:
    words = "the quick brown fox jumps over the lazy dog while seven tired apples count to ninety".split()
    text = lambda i: " ".join(words[(i + j) % len(words)] for j in range(400))  # noqa: E731
    gsm = [{"question": text(i), "answer": text(i + 1) + " #### 5"} for i in range(64)]
    (tmp / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    (tmp / "long.tsv").write_text("sentence\tlabel\n" + "".join(f"{text(i)}\t{i % 2}\n" for i in range(128)))
    return [
        f"output_dir={tmp}/runs",
        "data.source=files",
        "model.device=cpu",
        "model.precision=fp32",
        "federation.n_clients=2",
        "federation.local_steps=2",
        "partition.min_size=8",
        "lora.rank=8",
        "lora.dropout=0.0",
        "train.optimizer=adamw",
    ]


def _files(case: list[str], tmp: Path) -> list[str]:
    if "data.task=gsm8k" in case:
        return [f"data.train_file={tmp}/gsm.jsonl", f"data.eval_file={tmp}/gsm.jsonl"]
    return [f"data.train_file={tmp}/long.tsv", f"data.eval_file={tmp}/long.tsv"]


def _rss() -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return float(status["VmRSS"].split()[0]) * 1024, float(status["VmHWM"].split()[0]) * 1024


def measure(overrides: list[str]) -> dict:
    """In this process: plan, build, and one client's turn; the figures in bytes."""
    from sfedlora.config import build_config
    from sfedlora.data import load_task
    from sfedlora.driver.plan import counts, decoder_activation_bytes, encoder_activation_bytes, plan
    from sfedlora.engine.fused import fused_round
    from sfedlora.federated.client import client_round
    from sfedlora.federated.federation import build_federation

    cfg = build_config(overrides=overrides)
    p = plan(cfg)
    c = counts(cfg)
    before_build = _rss()[0]
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    built = _rss()[0]
    Path("/proc/self/clear_refs").write_text("5")
    fused = cfg.simulator.engine == "fused"
    if fused:
        fused_round(
            fed, [(fed.client(k), fed.clients[k], fed.download(k)) for k in range(len(fed.clients))], 1
        )
    else:
        client_round(fed, fed.client(0), fed.clients[0], fed.download(0), 1)
    peak = _rss()[1]
    adapter = sum(t.numel() for t in fed.params.values())
    # The plan assumes the tiny LLaMA's full 2,048-token vocabulary; this text trains a smaller one.
    if c["causal"]:
        c["dims"]["vocab"] = fed.model.get_output_embeddings().out_features
    tokens, length = cfg.train.batch_size * cfg.model.max_length, cfg.model.max_length
    lora = {"rank_sum": cfg.lora.rank * len(c["adapted"]) / c["dims"]["layers"], "dropout_in": 0}
    gc = cfg.model.gradient_checkpointing
    if c["causal"]:
        act = decoder_activation_bytes(c["dims"], tokens, length, 4, lora, gc)
    else:
        act = encoder_activation_bytes(c["dims"], tokens, length, 4, lora, gc, fused=False)
    planned = sum(p.parts.values()) if fused else act + 4 * adapter * 4
    return {
        "planned": planned,
        "measured": peak - built,
        "build": built - before_build,
        "plan_lines": p.lines,
    }


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(measure(json.loads(sys.argv[1]))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = _data(Path(tmp))
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "SFEDLORA_CACHE": f"{tmp}/cache"}
        for name, case, gc in CASES:
            args = [*base, *case, *_files(case, Path(tmp)), f"model.gradient_checkpointing={str(gc).lower()}"]
            out = subprocess.run(
                [sys.executable, __file__, json.dumps(args)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()[-1]
            rows.append({"case": name, "checkpointing": gc, **json.loads(out)})
    (HERE / "memory_plan.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| case | checkpointing | planned (MB) | measured peak (MB) | planned / measured |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {'on' if r['checkpointing'] else 'off'} | {r['planned'] / 1e6:.1f} | "
            f"{r['measured'] / 1e6:.1f} | {r['planned'] / r['measured']:.2f} |"
        )


if __name__ == "__main__":
    main()
