"""The engines on one GPU, against `sfedlora plan`: for a lent H100 (under 8 minutes, no downloads).

    python benchmarks/gpu_check.py [--out gpu_check.json]

Models come from the config files in benchmarks/model-configs with random weights, written
once to a temporary directory (nothing is downloaded): a RoBERTa-large-shaped classifier
(MiniLM's tokenizer, whose ids fit its vocabulary) on the bundled SST-2 sample, and a
LLaMA-2-7B-shaped causal LM stored in 4 bit (NF4, QLoRA) with a tokenizer trained on the
synthetic data. Cases, each a two-round run through ``sfedlora.driver.experiment.run``:

- RoBERTa-large, N = 20 clients x 2 local steps of 16, r in {8, 2048}, per-client and fused engines;
- LLaMA-2-7B in 4 bit, one client, one round of 2 steps of 2 x 256 tokens.

Printed per case: seconds per round (the last round: the first pays for warm-up), peak GPU
memory (torch's allocator) against `sfedlora plan`'s device forecast, and what
``model.attention: auto`` chose at the case's length. Exits with a message when no CUDA
device exists.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORDS = "the quick brown fox jumps over the lazy dog while seven tired apples count to ninety".split()


def roberta_dir(root: Path) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from sfedlora.lora.models import resolve_model_path

    target = root / "roberta-large"
    config = AutoConfig.from_pretrained(HERE / "model-configs" / "roberta-large")
    config.num_labels = 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(target)
    minilm = Path(resolve_model_path("minilm"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / name, target / name)
    return target


def llama_dir(root: Path, texts: list[str]) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from sfedlora.lora.tiny_llama import train_tokenizer

    target = root / "llama-2-7b"
    config = AutoConfig.from_pretrained(HERE / "model-configs" / "llama-2-7b")
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):  # random init of 7B weights: seconds on the GPU, minutes on a CPU
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    train_tokenizer(texts).save_pretrained(target)
    return target


def gsm_file(root: Path) -> tuple[Path, list[str]]:
    text = lambda i: " ".join(WORDS[(i + j) % len(WORDS)] for j in range(120))  # noqa: E731
    rows = [{"question": text(i), "answer": text(i + 1) + " #### 5"} for i in range(16)]
    path = root / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [r["question"] for r in rows] + [r["answer"] for r in rows]


def case(name: str, overrides: list[str]) -> dict:
    from sfedlora.config import build_config
    from sfedlora.driver.experiment import run
    from sfedlora.driver.plan import plan
    from sfedlora.lora.attention import choose_attention

    cfg = build_config(overrides=overrides)
    forecast = plan(cfg).device_bytes
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    records = run(cfg).records
    wall = time.perf_counter() - start
    row = {
        "case": name,
        "s_per_round": records[-1]["seconds"],
        "wall_s": wall,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "plan_gb": forecast / 1e9,
        "attention": choose_attention(cfg.model.attention, "cuda", cfg.model.max_length),
    }
    print(
        f"{name:42s} {row['s_per_round']:7.2f} s/round  peak {row['peak_gb']:6.2f} GB  "
        f"plan {row['plan_gb']:6.2f} GB  attention {row['attention']}",
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a machine with an NVIDIA GPU)")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = [
            f"output_dir={root / 'runs'}",
            "model.device=cuda",
            "model.precision=bf16",
            "eval.every=1000",
        ]
        roberta = roberta_dir(root)
        for rank in (8, 2048):
            for engine in ("per-client", "fused"):
                rows.append(
                    case(
                        f"RoBERTa-large N=20 r={rank} {engine}",
                        [
                            *common,
                            f"model.name_or_path={roberta}",
                            "model.max_length=128",
                            f"lora.rank={rank}",
                            "federation.n_clients=20",
                            "federation.rounds=2",
                            "federation.local_steps=2",
                            "partition.min_size=16",
                            "train.batch_size=16",
                            f"simulator.engine={engine}",
                        ],
                    )
                )
        gsm, texts = gsm_file(root)
        llama = llama_dir(root, texts)
        rows.append(
            case(
                "LLaMA-2-7B 4-bit, 1 client, 1 round",
                [
                    *common,
                    f"model.name_or_path={llama}",
                    "model.quantization=4bit",
                    "model.max_length=256",
                    "data.task=gsm8k",
                    "data.source=files",
                    f"data.train_file={gsm}",
                    f"data.eval_file={gsm}",
                    "federation.n_clients=1",
                    "federation.rounds=1",
                    "federation.local_steps=2",
                    "partition.min_size=2",
                    "train.batch_size=2",
                ],
            )
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
