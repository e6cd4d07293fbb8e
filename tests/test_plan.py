"""sfedlora plan: parameter counts against hand counts and built models, memory formulas, the command."""

import pytest
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.models import build_classifier, trainable_parameters
from sfedlora.plan import (
    base_bytes,
    counts,
    decoder_activation_bytes,
    lora_params,
    optimizer_moments,
)

runner = CliRunner()


def test_lora_params_is_rank_times_in_plus_out_per_layer():
    # LLaMA-2-7B, r = 512 on q, k, v, o: 512 * (4096 + 4096) * 4 * 32, the "about 0.5 B".
    assert lora_params([(4096, 4096)] * 4 * 32, 512) == 536_870_912
    assert lora_params([(64, 172), (172, 64)], 3) == 3 * 2 * 236


def test_optimizer_moments():
    assert optimizer_moments("adamw", 0.0) == 2
    assert optimizer_moments("sgd", 0.9) == 1
    assert optimizer_moments("sgd", 0.0) == 0


def test_base_bytes_by_quantization():
    layers, other = [(4096, 4096), (4096, 11008)], 1000
    weights = 4096 * 4096 + 4096 * 11008
    assert base_bytes(layers, other, 2, "none") == (weights + other) * 2
    assert base_bytes(layers, other, 2, "8bit") == weights + 4 * (4096 + 11008) + 4 * other
    assert base_bytes(layers, other, 2, "4bit") == pytest.approx(weights * 0.51587 + 4 * other, rel=1e-4)


def test_decoder_activations_by_hand():
    dims = {"hidden": 64, "mlp": 172, "heads": 4, "layers": 2, "vocab": 274}
    lora = {"rank_sum": 32, "dropout_in": 0}
    # per layer and token: 2 fp32 norm inputs (512) + 4 heads' logsumexp (16) + 4 * (5*64 + 3*172 + 32);
    # the loss: 12 bytes per vocabulary entry; the mask: 4 * 16 * 16 per layer and sequence.
    per_layer = 512 + 16 + 4 * (320 + 516 + 32)
    expected = 2 * per_layer * 32 + 12 * 274 * 32 + 4 * 16 * 16 * 2 * 2
    assert decoder_activation_bytes(dims, 32, 16, 4, lora, False) == expected
    checkpointed = 2 * 4 * 64 * 32 + per_layer * 32 + 12 * 274 * 32 + 4 * 16 * 16 * 2 * 2
    assert decoder_activation_bytes(dims, 32, 16, 4, lora, True) == checkpointed


def test_tiny_llama_counts_by_hand():
    c = counts(build_config(overrides=["model.name_or_path=tiny-llama", "data.task=gsm8k", "lora.rank=4"]))
    # embeddings and output layer 2 * 2048 * 64; per layer q, k, v, o 4 * 64 * 64, the MLP 3 * 64 * 172
    # and two norms; the final norm.
    assert c["total"] == 2 * 2048 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 172 + 2 * 64) + 64
    assert c["per_rank"] * 4 == 4 * (64 + 64) * 4 * 2
    assert len(c["quantizable"]) == 2 * 7  # the output layer stays unquantized


def test_minilm_counts_match_the_built_model():
    cfg = build_config(overrides=["lora.rank=8"])
    c = counts(cfg)
    model, _ = build_classifier("minilm", 2, 8, 16, "lora", 1)
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    base = sum(
        p.numel() for n, p in model.named_parameters() if ".lora_" not in n and "modules_to_save" not in n
    )
    assert c["total"] == base
    assert c["per_rank"] * 8 + c["head"] == trainable


def test_plan_command_prints_the_plan():
    result = runner.invoke(app, ["plan", "--set", "model.device=cpu"])
    assert result.exit_code == 0, result.output
    for word in ("base", "all clients", "activations", "with gradient checkpointing", "fits"):
        assert word in result.output


def test_plan_command_refuses_a_model_without_config(tmp_path):
    result = runner.invoke(app, ["plan", "--set", f"model.name_or_path={tmp_path}"])
    assert result.exit_code == 2
    assert "error:" in result.output and "config.json" in result.output
