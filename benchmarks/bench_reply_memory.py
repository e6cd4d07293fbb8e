"""Memory a Flower ServerApp holds for one large update, through sfedlora's own reply path.

    python benchmarks/bench_reply_memory.py [--mb 600] [--out benchmarks/reply_memory.json]

Builds one client's reply as a SuperNode sends it (an ``ArrayRecord`` of fp32 LoRA A, ``--mb``
megabytes), then decodes it as the ServerApp does (``records.receive_train_reply``: header
checks, then ``np.load``), and reports the process's resident memory (RSS) at each step in
units of the update's size. The SuperLink's object store, a separate process, holds one more
copy of each reply's bytes until the ServerApp pulls it; it is not measured here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch
from flwr.app import Message

from sfedlora.federated.client import ClientResult
from sfedlora.flower.records import Request, receive_train_reply, train_reply


def rss() -> int:
    """This process's resident memory (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=600)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    n = args.mb * 2**20 // 4
    start = rss()
    update = {"lora_A.weight": torch.randn(n // 4096, 4096)}
    size = update["lora_A.weight"].numel() * 4
    after_tensor = rss()
    reply = train_reply(ClientResult(0.5, 1, {}, 8), update, Request(None, "", "run", 0, 1, {}))
    del update
    gc.collect()
    after_message = rss()  # the reply's bytes only: what the ServerApp holds once it pulled it
    msg = Message(reply, dst_node_id=1, message_type="train")
    expected = {"lora_A.weight": torch.empty(n // 4096, 4096)}
    base = rss()
    _, decoded = receive_train_reply(msg, expected, "run", 0, 1)
    after_decode = rss()
    out = {
        "update_bytes": size,
        "tensor_rss": (after_tensor - start) / size,
        "message_rss_after_tensor_freed": (after_message - start) / size,
        "decode_adds": (after_decode - base) / size,
        "serverapp_holds_per_reply": (after_decode - base + after_message - start) / size,
    }
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set
        setattr(TaskIdentity, attr, 1)
    main()
