"""examples/flowertune-sfed, Flower's FlowerTune LLM app converted to SFed-LoRA, run as its README
says (``flwr run``) on Flower's simulation engine: 2 nodes, 2 rounds, the tiny LLaMA on GSM8K."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sfedlora.flower.deploy import free_port
from sfedlora.lora.scaling import gamma
from sfedlora.lora.tiny_llama import tiny_llama_dir
from sfedlora.peft import check_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flowertune-sfed"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
RANK, ALPHA, NODES = 4, 8, 2


def tool(name: str) -> str:
    """A Flower command installed next to this interpreter (a virtual environment), else on PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def started(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture
def superlink(tmp_path):
    """A local simulation SuperLink of this test's own (port, FLWR_HOME), which ``flwr run`` uses
    instead of starting the shared one it would leave running; stopped at the end."""
    port = free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # installed already; never fetched
    }
    command = [
        tool("flower-superlink"),
        "--insecure",
        "--simulation",
        "--disable-runtime-dependency-installation",
    ]
    with (tmp_path / "superlink.log").open("wb") as log:
        link = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not started(port):
            assert link.poll() is None and time.monotonic() < deadline, (
                tmp_path / "superlink.log"
            ).read_text()
            time.sleep(0.3)
        yield env
    finally:
        os.killpg(link.pid, signal.SIGTERM)  # the SuperLink and the app processes it started
        link.wait(timeout=30)


def test_the_flowertune_app_keeps_b_per_node_at_the_sfed_gamma(tmp_path, superlink):
    lines = GSM8K.read_text().splitlines()[:16]
    (tmp_path / "gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    records = [json.loads(line) for line in lines]
    model_dir = tiny_llama_dir([r["question"] + " " + r["answer"] for r in records], cache=tmp_path / "cache")
    overrides = {
        "model.name": f"'{model_dir}'",
        "dataset.name": f"'{tmp_path / 'gsm8k.jsonl'}'",
        "model.quantization": 0,
        "model.gradient-checkpointing": "false",
        "train.training-arguments.gradient-checkpointing": "false",
        "train.training-arguments.bf16": "false",
        "model.lora.peft-lora-r": RANK,
        "model.lora.peft-lora-alpha": ALPHA,
        "train.seq-length": 128,
        "train.training-arguments.per-device-train-batch-size": 2,
        "train.training-arguments.max-steps": 2,
        "train.save-every-round": 1,
        "strategy.fraction-train": 1.0,
        "num-server-rounds": 2,
    }
    done = subprocess.run(
        [tool("flwr"), "run", str(EXAMPLE), "--stream", "--federation-config", f"num-supernodes={NODES}"]
        + ["--run-config", " ".join(f"{k}={v}" for k, v in overrides.items())],
        cwd=tmp_path,
        env=superlink,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = (tmp_path / "results").iterdir()
    metrics = json.loads((results / "train_metrics.json").read_text())
    assert len(metrics["train"]) == 2, done.stdout[-5000:]  # the log shows why nodes failed
    # Round 1 starts from PEFT's zero B; round 2 from each node's own (the server's B stays zero).
    assert metrics["train"]["1"]["own-b-norm"] == 0 and metrics["train"]["2"]["own-b-norm"] > 0
    assert metrics["refused"] == {"1": [], "2": []}

    nodes = [load_file(results / "peft_2" / f"node_{k}" / "adapter_model.safetensors") for k in range(NODES)]
    server = load_file(results / "peft_2" / "server" / "adapter_model.safetensors")
    b_names = [n for n in server if ".lora_B." in n]
    assert b_names and all(not server[n].any() for n in b_names)
    assert all(not torch.equal(nodes[0][n], nodes[1][n]) and nodes[0][n].any() for n in b_names)

    # Each node's adapter loads with SFed-LoRA's γ = α·√(N/r) = 8·√(2/4), N = 2 nodes averaged.
    config = json.loads((results / "peft_2" / "node_0" / "adapter_config.json").read_text())
    assert (config["r"], config["use_rslora"]) == (RANK, True)
    assert (
        config["lora_alpha"] / RANK**0.5 == pytest.approx(gamma("sfed", ALPHA, RANK, NODES)) == 8 * 0.5**0.5
    )
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), results / "peft_2" / "node_0"
    )
    gammas = list(check_model(model, ALPHA, NODES).values())
    assert gammas == pytest.approx([8 * 0.5**0.5] * len(gammas))
