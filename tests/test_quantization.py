"""One GPU: a base model quantized with bitsandbytes, clients' personal state kept off the accelerator."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.driver.experiment import run
from sfedlora.errors import SfedloraError
from sfedlora.lora.models import Compute, _to_host

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
runner = CliRunner()


def test_quantization_is_refused_for_a_classifier(tiny_overrides):
    result = runner.invoke(
        app, ["run", *[a for o in tiny_overrides for a in ("--set", o)], "--set", "model.quantization=4bit"]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "model.quantization=none" in result.output


def test_quantization_without_bitsandbytes_names_the_extra(lm_overrides, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(SfedloraError, match=r"sfedlora\[quantization\]"):
        run(build_config(overrides=[*lm_overrides, "model.quantization=4bit"]))


def test_4bit_tiny_llama_trains_with_a_fp32_adapter(lm_overrides):
    bnb = pytest.importorskip("bitsandbytes")
    from sfedlora.data import load_task
    from sfedlora.federated.federation import build_federation

    cfg = build_config(
        overrides=[*lm_overrides, "name=q4", "model.quantization=4bit", "model.precision=fp32"]
    )
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    layers = [m for m in fed.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every linear layer of the blocks; the output layer stays unquantized
    assert layers[0].weight.quant_state.quant_type == "nf4" and layers[0].weight.quant_state.nested
    assert {p.dtype for p in fed.params.values()} == {torch.float32}
    result = run(cfg)
    losses = [
        json.loads(line)["train_loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def _persistent_adamw_run(overrides, name):
    cfg = build_config(
        overrides=[*overrides, f"name={name}", "train.optimizer=adamw", "train.optimizer_state=persistent"]
    )
    result = run(cfg)
    return (result.run_dir / "metrics.jsonl").read_text(), result


def test_clients_state_offloaded_gives_identical_results(lm_overrides, monkeypatch):
    """On a GPU clients' states live in host memory between turns; forced on the CPU (copies, unpinned)
    the run is the same to the bit."""
    plain, _ = _persistent_adamw_run(lm_overrides, "plain")
    monkeypatch.setattr(Compute, "offload", lambda self, tree: _to_host(tree, pin=False))
    offloaded, _ = _persistent_adamw_run(lm_overrides, "offloaded")

    def strip(text):  # the wall-clock times differ
        return [{k: v for k, v in json.loads(r).items() if "seconds" not in k} for r in text.splitlines()]

    assert strip(plain) == strip(offloaded)


@cuda
def test_device_memory_does_not_grow_with_clients(lm_overrides):
    from sfedlora.data import load_task
    from sfedlora.federated.federation import build_federation

    def allocated(n):
        cfg = build_config(
            overrides=[
                *lm_overrides,
                "model.device=cuda",
                f"federation.n_clients={n}",
                "lora.rank=64",
                "partition.min_size=1",
                "train.optimizer=adamw",
                "train.optimizer_state=persistent",
            ]
        )
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
        assert all(t.device.type == "cpu" and t.is_pinned() for c in fed.clients for t in c.tensors.values())
        used = torch.cuda.memory_allocated() - before
        del fed
        return used

    adapter = 4 * 64 * (64 + 64) * 4 * 2  # one client's r = 64 adapter in fp32
    assert allocated(32) - allocated(2) < adapter
