"""sfedlora plan: parameter counts against hand counts and built models, memory formulas, the command."""

import pytest
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.driver.plan import (
    base_bytes,
    counts,
    decoder_activation_bytes,
    encoder_activation_bytes,
    fused_bytes,
    kind_params,
    lora_params,
    optimizer_moments,
    plan,
    traffic,
)
from sfedlora.lora.models import build_classifier, trainable_parameters

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


def test_encoder_activations_by_hand():
    dims = {"hidden": 8, "mlp": 32, "heads": 2, "layers": 3}
    lora = {"rank_sum": 4, "dropout_in": 0}
    # per layer and token besides its input: 7 * 8 + 32 + 4 + 3 attention rows of 2 heads x 5 at 4 bytes,
    # and 16 bytes of LayerNorm statistics; live at a layer's end: 32 + 3 * 8 at 4 bytes.
    saved, live = 4 * (56 + 32 + 4 + 30) + 16, 4 * (32 + 24)
    assert encoder_activation_bytes(dims, 10, 5, 4, lora, False, False) == (3 * (4 * 8 + saved) + live) * 10
    # checkpointed: 3 layer inputs, the embeddings' 3 fp32 tensors, the incoming gradient, one layer
    checkpointed = (3 * 4 * 8 + 3 * 4 * 8 + 4 * 8 + saved + live) * 10
    assert encoder_activation_bytes(dims, 10, 5, 4, lora, True, False) == checkpointed
    # a fused attention kernel keeps no probabilities
    assert (
        encoder_activation_bytes(dims, 10, 5, 4, lora, False, True)
        == (3 * (4 * 8 + saved - 4 * 30) + live) * 10
    )


def test_fused_engine_bytes_by_hand():
    # 4 adapted (64, 64) layers in 2 blocks, a 64 -> 2 head (130 parameters, 128 weights).
    c = {"per_rank": 512, "in_per_rank": 256, "head": 130, "head_weights": 128, "dims": {"layers": 2}}
    assert kind_params(c, 4) == {"A": 1024, "B": 1024, "head": 130}
    trained = 1024 + 130  # B and head (FFA-LoRA)
    stacks, gathered = fused_bytes(c, 4, 3, trained, 2, 16, 4, False)
    # 3 slots of 2048 + 130 fp32 parameters, and a gradient and 2 AdamW moments of the trained ones
    assert stacks == 4 * 3 * (2048 + 130 + 3 * 1154)
    # 16 rows, each with its own A and B of every layer and head weight, at 4 bytes
    assert gathered == 4 * 16 * (2048 + 128)
    # with checkpointing, one block's LoRA (2 of 4 layers) at a time; bf16 keeps 2-byte copies
    assert fused_bytes(c, 4, 3, trained, 2, 16, 2, True)[1] == 2 * 16 * (1024 + 128)


def test_plan_counts_the_fused_engine():
    base = ["model.device=cpu", "model.precision=fp32", "federation.n_clients=10", "model.max_length=128"]
    per_client = plan(build_config(overrides=[*base, "train.batch_size=16", "simulator.engine=per-client"]))
    fused = plan(build_config(overrides=[*base, "simulator.engine=fused", "simulator.fused_tokens=2048"]))
    # the same micro-batch (16 x 128 tokens): the stacks, gathers and copies are what is added
    activations = next(line for line in fused.lines if line.startswith("activations"))
    assert "16 x 128 tokens" in activations and "fused engine" in "\n".join(fused.lines)
    assert fused.device_bytes > per_client.device_bytes


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
    params = dict(model.named_parameters())
    assert c["in_per_rank"] * 8 == sum(p.numel() for n, p in params.items() if ".lora_A." in n)
    # the pooler's and the classifier's weight matrices, which the fused engine gathers per row
    head = [p for n, p in params.items() if p.requires_grad and ".lora_" not in n and p.dim() == 2]
    assert c["head_weights"] == sum(p.numel() for p in head) == 384 * 384 + 2 * 384


def test_plan_command_prints_the_plan():
    result = runner.invoke(app, ["plan", "--set", "model.device=cpu"])
    assert result.exit_code == 0, result.output
    for word in ("base", "all clients", "activations", "with gradient checkpointing", "fits"):
        assert word in result.output


def test_traffic_by_hand():
    """A LoRA layer 10 -> 6 at r = 2 (A 2·10, B 2·6) and a head of 5: fp32 bytes per client."""
    from sfedlora.federated.methods import get_method

    c = {"per_rank": 16, "in_per_rank": 10, "head": 5, "adapted": [(10, 6)]}
    assert traffic(c, get_method("fedit"), [2], 3, 1) == (4 * (20 + 12 + 5),) * 2
    assert traffic(c, get_method("fedsa-lora"), [2], 3, 1) == (4 * (20 + 5),) * 2  # B stays home
    # RoLoRA trains A and B in turn: the larger round's upload; mixed ranks: the largest client
    up, down = traffic(c, get_method("rolora"), [1, 2], 4, 2)
    assert up == 4 * (20 + 5) and down == 4 * (20 + 12 + 5)
    # The base change goes down with the adapter as the round's change: FedEx-LoRA's residual
    # of one client, rank 2 + 2, as factors (4 · (6 + 10) fp32 and 4 float64 weights, 288 B)
    # is larger than the 10 x 6 matrix (240 B); FLoRA's stack of 1, rank 2: factors (144 B).
    adapter = 4 * (20 + 12 + 5)
    assert traffic(c, get_method("fedex-lora"), [2], 3, 1)[1] == adapter + 4 * 60
    assert traffic(c, get_method("flora"), [2], 3, 1)[1] == adapter + 2 * (4 * 16 + 8)
    # Two of three clients of ranks 1, 2, 4: a stack of rank 2 + 4, its matrix smaller.
    assert traffic(c, get_method("flora"), [1, 2, 4], 3, 2)[1] == 4 * (4 * 10 + 4 * 6 + 5) + 4 * 60


def test_plan_warns_where_a_rounds_replies_do_not_fit_the_server(monkeypatch):
    """LLaMA-2-7B at r = 2048 on q and v, 20 clients: 2.1 GB of A each way per client; the
    SuperLink holds both, the ServerApp the download, the reply and the reply decoded."""
    import sfedlora.driver.plan as plan_module

    monkeypatch.setattr(plan_module, "device_memory", lambda device: ("CPU", 64e9))
    cfg = build_config(
        overrides=[
            "model.name_or_path=benchmarks/model-configs/llama-2-7b",
            "data.task=gsm8k",
            "model.target_modules=[q_proj, v_proj]",
            "lora.rank=2048",
            "federation.n_clients=20",
            "model.device=cpu",
        ]
    )
    lines = "\n".join(plan(cfg).lines)
    a = 4 * 32 * 2 * 2048 * 4096
    assert f"traffic      {a / 1e9:.2f} GB up" in lines
    assert f"server side  {20 * 5 * a / 1e9:.2f} GB on Flower" in lines
    assert "does NOT fit this host's 64.00 GB: lower federation.clients_per_round or lora.rank" in lines


def test_plan_command_refuses_a_model_without_config(tmp_path):
    result = runner.invoke(app, ["plan", "--set", f"model.name_or_path={tmp_path}"])
    assert result.exit_code == 2
    assert "error:" in result.output and "config.json" in result.output


def test_plan_counts_the_base_change_of_a_method_that_owns_one():
    base = ["model.device=cpu", "model.precision=fp32", "simulator.engine=per-client"]
    fedit = plan(build_config(overrides=[*base, "method=fedit"]))
    fedex = plan(build_config(overrides=[*base, "method=fedex-lora"]))
    # MiniLM: LoRA on query and value of 6 layers, 384 x 384 each; ΔW in fp32 and W0 kept in fp32.
    assert fedex.parts["base_change"] == (4 + 4) * 6 * 2 * 384 * 384
    assert fedex.device_bytes - fedit.device_bytes == fedex.parts["base_change"]
    assert any(line.startswith("base change") for line in fedex.lines)
    # A node that sat out rounds catches up with at most the whole ΔW (6.75 MiB).
    traffic_line = next(line for line in fedex.lines if line.startswith("traffic"))
    assert traffic_line.endswith("a node that sat out rounds gets up to the whole ΔW, 6.75 MiB")


def test_plan_counts_feddpas_second_adapter_its_traffic_and_its_engine():
    base = ["model.device=cpu", "model.precision=fp32", "simulator.engine=per-client"]
    fedit = plan(build_config(overrides=[*base, "method=fedit"]))
    dpa = plan(build_config(overrides=[*base, "method=feddpa"]))
    lora = 8 * 6 * 2 * (384 + 384)  # MiniLM: r = 8 on query and value of 6 layers
    # The personal adapter: in each of the 10 clients' states (fp32), and trained with its
    # gradient, the initial copy and two AdamW moments (5 fp32 copies).
    assert dpa.device_bytes - fedit.device_bytes == 4 * lora * (10 + 5)
    traffic = [next(x for x in p.lines if x.startswith("traffic")) for p in (fedit, dpa)]
    assert traffic[0] == traffic[1]  # the personal adapter never moves
    # On a GPU, auto would pick the fused engine, which FedDPA cannot run.
    assert plan(build_config(overrides=["model.device=cuda", "method=feddpa"])).parts["stacks"] == 0


def test_plan_picks_the_per_client_engine_for_hetloras_rank_pruning():
    # On a GPU auto would pick the fused engine, which refuses the pruning.
    gpu = ["model.device=cuda", "method=hetlora"]
    assert plan(build_config(overrides=gpu)).parts["stacks"] > 0
    assert plan(build_config(overrides=[*gpu, "federation.hetlora_prune_decay=0.9"])).parts["stacks"] == 0
