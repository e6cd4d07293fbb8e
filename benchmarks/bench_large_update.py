"""One update over 512 MB across a local Flower deployment (TLS, node authentication), with
each process's peak memory.

    python benchmarks/bench_large_update.py [--rank 30000] [--out benchmarks/large_update.json]

MiniLM with LoRA on query and value at ``--rank`` (r = 30000: A is 30000 x 384 in each of 12
layers, 553 MB in fp32), one client, one round of one SGD step, sfed-lora (the client sends A
and the head). ``sfedlora flower up``'s deployment runs it; a sampler reads every process's
peak resident memory (VmHWM) under this one: the SuperLink, the SuperNode, the ServerApp and
the ClientApp. The round's record says whether the update was aggregated.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from sfedlora.config import build_config
from sfedlora.flower.deploy import up

ROLES = {
    "flower-superlink": "SuperLink",
    "flower-supernode": "SuperNode",
    "flwr-serverapp": "ServerApp",
    "flwr-clientapp": "ClientApp",
}


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            out[int(d.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return out


def sample(peaks: dict[str, int], stop: threading.Event) -> None:
    import os

    me = os.getpid()
    while not stop.is_set():
        table = processes()
        mine = {me}
        for _ in range(6):  # descendants, a few generations down
            mine |= {p for p, (parent, _) in table.items() if parent in mine}
        for pid in mine - {me}:
            role = next((r for key, r in ROLES.items() if key in table[pid][1]), None)
            if role is None:
                continue
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            hwm = next(
                (int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")), 0
            )
            peaks[role] = max(peaks.get(role, 0), hwm)
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=30000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sfedlora-large-"))
    cfg = build_config(
        overrides=[
            f"output_dir={work / 'runs'}",
            "name=large",
            f"lora.rank={args.rank}",
            "federation.n_clients=1",
            "federation.rounds=1",
            "federation.local_steps=1",
            "train.optimizer=sgd",
            "train.lr=0.001",
            "train.batch_size=2",
            "model.max_length=16",
            "data.max_train_examples=8",
            "data.max_eval_examples=4",
            "eval.batch_size=4",
            "partition.min_size=1",
            "save_adapters=false",
            "flower.round_timeout=3000",
        ]
    )
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(peaks, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    records: list[dict] = []
    try:
        up(cfg, work / "deployment", timeout=3000, on_record=records.append)
    finally:
        stop.set()
        sampler.join()
    update = records[0]["bytes_up"]
    out = {
        "rank": args.rank,
        "update_bytes": update,
        "aggregated": records[0]["aggregated"],
        "rejected": records[0]["rejected"],
        "seconds": time.perf_counter() - start,
        "peak_bytes": peaks,
        "peak_per_update": {k: v / update for k, v in peaks.items()},
    }
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
