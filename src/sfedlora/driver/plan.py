"""``sfedlora plan``: the memory a run needs, from the model's config.json alone.

Nothing is loaded: the architecture is built on PyTorch's ``meta`` device (shapes without
storage) to count parameters and find the LoRA targets' shapes, and the sizes follow from
those counts. The activation model counts the tensors autograd saves per token in one
layer (checked with ``saved_tensors_hooks`` on the tiny LLaMA and MiniLM, and against peak
memory in ``benchmarks/bench_memory_plan.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import SfedloraError
from ..federated.catchup import change_bytes

GB = 1e9
LM_TASKS = ("gsm8k", "alpaca")
# bitsandbytes' bytes per quantized weight: NF4 is 4 bits plus one absmax per block of 64, itself
# 8-bit with one fp32 per 256 blocks under double quantization; LLM.int8 is a byte plus one fp32
# scale per output row (added per layer in base_bytes).
BYTES_PER_WEIGHT = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
QUANTIZED = {"4bit": "NF4, double quant", "8bit": "LLM.int8"}
GPU_RESERVE = 1e9  # CUDA context and allocator slack, not in the sums


def lora_params(shapes: list[tuple[int, int]], rank: int) -> int:
    """A LoRA adapter's parameters: r·(d_in + d_out) per adapted ``(d_in, d_out)`` layer."""
    return rank * sum(d_in + d_out for d_in, d_out in shapes)


def optimizer_moments(optimizer: str, momentum: float) -> int:
    """fp32 tensors the optimizer keeps per trained parameter: AdamW 2, SGD 1 with momentum, else 0."""
    return 2 if optimizer == "adamw" else int(momentum > 0)


def base_bytes(quantizable: list[tuple[int, int]], other_params: int, dtype_bytes: int, quantization: str):
    """The frozen base: its linear layers (``quantizable``: (d_in, d_out)) quantized or at
    ``dtype_bytes``, the rest at ``dtype_bytes`` (fp32 when quantized: PEFT's k-bit preparation
    upcasts norms and embeddings)."""
    weights = sum(i * o for i, o in quantizable)
    if quantization == "none":
        return (weights + other_params) * dtype_bytes
    scales = 4 * sum(o for _, o in quantizable) if quantization == "8bit" else 0
    return weights * BYTES_PER_WEIGHT[quantization] + scales + other_params * 4


def decoder_activation_bytes(dims: dict, tokens: int, length: int, a: int, lora: dict, checkpointing: bool):
    """Bytes a LLaMA-like decoder keeps for backward over ``tokens`` tokens (sequences of ``length``).

    Per layer and token: the two RMSNorm inputs in fp32, the LoRA input, q, k, v and the fused
    attention's output, SiLU's input and output and the up projection (3 of the MLP width), each
    adapted layer's rank-r intermediate, and its dropout copy and mask (about 1.4 d_in). Then the
    loss: logits, their fp32 log-softmax and its gradient. With checkpointing only each layer's
    input is kept, and one layer is recomputed at a time.
    """
    h, i, heads, layers, vocab = dims["hidden"], dims["mlp"], dims["heads"], dims["layers"], dims["vocab"]
    layer = 2 * 4 * h + 4 * heads + a * (5 * h + 3 * i + lora["rank_sum"] + lora["dropout_in"])
    mask = 4 * length * length * layers * tokens / length  # the [1, 1, L, L] additive mask per sequence
    head = (12 + (2 * a if a < 4 else 0)) * vocab * tokens
    if checkpointing:
        return layers * a * h * tokens + layer * tokens + head + mask
    return layers * layer * tokens + head + mask


def encoder_activation_bytes(
    dims: dict, tokens: int, length: int, a: int, lora: dict, checkpointing: bool, fused: bool
):
    """As :func:`decoder_activation_bytes` for a BERT-like encoder. Per layer and token it saves
    its input, q, k and v, two dropout masks and two LayerNorm inputs (8 hidden-size tensors), the
    GELU input, LoRA's intermediates and dropout; and unless the attention kernel is fused (CUDA), 3
    attention-probability rows per head (softmax, its dropout mask and output) of ``length``.

    The peak comes at the end of a layer's forward (or its recomputation), where its FFN
    activation, attention output, FFN output and layer output are live besides what it saves.
    With checkpointing, transformers makes the embedding output require grad, so the embeddings
    keep three fp32 hidden-size tensors (their output, LayerNorm input, dropout mask), and the
    gradient of the recomputed layer's output waits while it is recomputed. Measured with the
    allocator's events under ``torch.profiler`` on MiniLM (benchmarks/README.md)."""
    h, i, heads, layers = dims["hidden"], dims["mlp"], dims["heads"], dims["layers"]
    attention = 0 if fused else 3 * heads * length
    # What a layer saves besides its input; 16: its two LayerNorms' fp32 means and inverse deviations.
    saved = a * (7 * h + i + lora["rank_sum"] + lora["dropout_in"] + attention) + 16
    live = a * (i + 3 * h)
    if checkpointing:
        return (layers * a * h + 3 * 4 * h + a * h + saved + live) * tokens
    return (layers * (a * h + saved) + live) * tokens


def kind_params(c: dict, rank: int) -> dict[str, int]:
    """A client's adapter parameters at ``rank`` by kind: LoRA A (r·d_in), B (r·d_out), head."""
    return {"A": rank * c["in_per_rank"], "B": rank * (c["per_rank"] - c["in_per_rank"]), "head": c["head"]}


def traffic(c: dict, method, ranks: list[int], rounds: int, sampled: int) -> tuple[int, int]:
    """Bytes one client sends up and gets down in a round, in fp32: the kinds the method
    uploads, and its global kinds, at the client's rank (the largest over rounds and ranks).
    A base change (FedEx-LoRA, FLoRA) goes down as a round's change, for a node that took the
    round before's download: the stack of the ``sampled`` largest ranks, or the matrix."""
    q = method.base_change_rank(sorted(ranks)[-sampled:])
    base = sum(change_bytes(o, i, q) for i, o in c["adapted"]) // 4 if q else 0
    size = {r: {**kind_params(c, r), "base": base} for r in set(ranks)}
    up = max(4 * sum(size[r][k] for k in method.uploaded(t)) for r in size for t in range(1, rounds + 1))
    return up, max(4 * sum(size[r][k] for k in method.global_kinds) for r in size)


def flower_server_bytes(up: int, down: int, sampled: int) -> int:
    """What a Flower round holds at once on the server side (benchmarks/bench_large_update.py):
    the SuperLink each client's download and reply; the ServerApp each download message it
    sent, each reply's bytes and its decoded tensors."""
    return sampled * (2 * down + 3 * up)


def fused_bytes(c: dict, rank: int, slots: int, trained: int, moments: int, rows: int, a: int, gc: bool):
    """The fused engine's device memory besides activations (fused.py, rowwise.py): the
    ``slots`` sampled clients' adapters stacked at full ``rank`` in fp32, with a gradient and the
    optimizer's moments for the ``trained`` parameters of each; and, per row of a micro-batch, its
    client's LoRA A and B and head Linear weights gathered and kept for backward at the compute
    precision (with checkpointing ``gc``, one layer's LoRA at a time). Returns (stacks, gathered)."""
    stacks = 4 * slots * (c["per_rank"] * rank + c["head"] + trained * (1 + moments))
    lora = c["per_rank"] * rank / (c["dims"]["layers"] if gc else 1)
    return stacks, a * rows * (lora + c["head_weights"])


@dataclass
class Plan:
    lines: list[str]
    device_bytes: float  # what the compute device must hold
    host_bytes: float  # what host memory must hold besides it (a GPU run); 0 on the CPU
    parts: dict[str, float]  # activations, and the fused engine's stacks, gathers and state copies


def _hf_config(cfg: RunConfig):
    """The model's config.json as a transformers config, without weights or a tokenizer."""
    from transformers import AutoConfig

    from ..lora.models import resolve_model_path
    from ..lora.tiny_llama import TINY_LLAMA, tiny_llama_config

    name = cfg.model.name_or_path
    if name == TINY_LLAMA:
        return tiny_llama_config()
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as err:
        raise SfedloraError(
            f"cannot read the config of {name!r} ({str(err).splitlines()[0]}): check model.name_or_path, "
            "or point it at a local directory holding the model's config.json"
        ) from None


def _skeleton(hf, causal: bool, num_labels: int):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if causal:
            return AutoModelForCausalLM.from_config(hf)
        hf.num_labels = num_labels
        return AutoModelForSequenceClassification.from_config(hf)


def _linears(model) -> dict[str, tuple[int, int]]:
    """Every linear layer's (d_in, d_out), nn.Linear and GPT-2's transposed Conv1D alike."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif type(m).__name__ == "Conv1D":
            out[name] = tuple(m.weight.shape)
    return out


def _targets(cfg: RunConfig, model_type: str, causal: bool) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    from ..lora.models import lm_target_modules

    chosen = cfg.model.target_modules
    if causal:
        chosen = lm_target_modules(model_type, chosen, cfg.model.lora_mlp)
    return list(chosen or PEFT_TARGETS.get(model_type, []))


def _num_labels(cfg: RunConfig) -> int:
    from ..data.glue import GLUE_TASKS

    spec = GLUE_TASKS.get(cfg.data.task)
    return spec.num_labels if spec else cfg.data.num_labels or 2


def _fmt(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.01 * GB else f"{n / 2**20:.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def device_memory(device: str) -> tuple[str, float]:
    """The compute device found and its memory: the GPU's total, or the host's available RAM."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({device})", float(props.total_memory)
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return "CPU, available host RAM", float(info["MemAvailable"].split()[0]) * 1024


def counts(cfg: RunConfig) -> dict:
    """Parameter counts of ``cfg``'s model and adapter, from its config.json alone."""
    causal = cfg.data.task in LM_TASKS
    hf = _hf_config(cfg)
    model = _skeleton(hf, causal, _num_labels(cfg))
    linears = _linears(model)
    targets = _targets(cfg, hf.model_type, causal)
    adapted = [s for n, s in linears.items() if any(n == t or n.endswith("." + t) for t in targets)]
    if not adapted:
        raise SfedloraError(f"no layer of {cfg.model.name_or_path!r} matches LoRA targets {targets}")
    heads = [n for n, _ in model.named_modules() if n.split(".")[-1] in ("classifier", "score", "pooler")]
    head = 0 if causal else sum(p.numel() for n, p in model.named_parameters() if n.startswith(tuple(heads)))
    head_weights = 0 if causal else sum(i * o for n, (i, o) in linears.items() if n.startswith(tuple(heads)))
    output = model.get_output_embeddings()
    out_name = next((n for n, m in model.named_modules() if m is output), None)
    quantizable = [s for n, s in linears.items() if n != out_name]
    total = sum(p.numel() for p in model.parameters())
    return {
        "causal": causal,
        "model_type": hf.model_type,
        "total": total,
        "quantizable": quantizable,
        "adapted": adapted,
        "targets": targets,
        "head": head,
        "head_weights": head_weights,
        "per_rank": lora_params(adapted, 1),
        "in_per_rank": sum(i for i, _ in adapted),
        "dims": {
            "hidden": hf.hidden_size,
            "mlp": getattr(hf, "intermediate_size", None) or 4 * hf.hidden_size,
            "heads": hf.num_attention_heads,
            "layers": hf.num_hidden_layers,
            "vocab": hf.vocab_size,
        },
    }


def plan(cfg: RunConfig) -> Plan:
    """What ``cfg`` needs on its compute device and in host memory, as printable lines."""
    from ..engine.executors import engine_rule
    from ..federated.kinds import BASE
    from ..federated.ranks import assign_ranks
    from ..federated.shared import method_of
    from ..lora.models import auto_device, auto_precision

    c = counts(cfg)
    m, lora, train, fed = cfg.model, cfg.lora, cfg.train, cfg.federation
    device = m.device if m.device != "auto" else auto_device()
    gpu = device.startswith("cuda")
    precision = m.precision if m.precision != "auto" else auto_precision(device)
    a = 4 if precision == "fp32" else 2
    storage = a if c["causal"] and gpu and m.quantization == "none" else 4
    base = base_bytes(
        c["quantizable"], c["total"] - sum(i * o for i, o in c["quantizable"]), storage, m.quantization
    )

    method = method_of(cfg)
    per_rank = c["per_rank"] * (2 if method.personal_adapter else 1)  # FedDPA's personal adapter too
    adapter = per_rank * lora.rank + c["head"]  # the shared model's adapter, at full rank
    moments = optimizer_moments(train.optimizer, train.momentum)
    ranks = assign_ranks(lora.client_ranks, fed.n_clients, lora.rank)
    kept = moments if train.optimizer_state == "persistent" else 0  # optimizer state kept between rounds
    states = sum(4 * (1 + kept) * (per_rank * r + c["head"]) for r in ranks)
    # Trained in place: the adapter, its gradients and moments; plus the run's initial adapter.
    training = 4 * adapter * (3 + moments)
    sim, length = cfg.simulator, m.max_length
    # local_epochs: taken as more than one step (the client sizes are not known here).
    steps = 1 if cfg.federation.local_steps == 1 else 2
    engine = sim.engine if sim.engine != "auto" else engine_rule(device, precision, steps)
    fused = engine == "fused" and not method.personal_adapter and fed.hetlora_prune_decay is None
    rows = max(sim.fused_tokens, length) // length if fused else train.batch_size
    tokens = rows * length
    lora_act = {
        "rank_sum": lora.rank * len(c["adapted"]) / c["dims"]["layers"],
        "dropout_in": 1.4 * sum(i for i, _ in c["adapted"]) / c["dims"]["layers"] if lora.dropout else 0,
    }
    if c["causal"]:
        act = {g: decoder_activation_bytes(c["dims"], tokens, length, a, lora_act, g) for g in (False, True)}
    else:
        act = {
            g: encoder_activation_bytes(c["dims"], tokens, length, a, lora_act, g, fused=gpu)
            for g in (False, True)
        }
    activations = act[m.gradient_checkpointing]
    parts = {"activations": activations, "stacks": 0, "gathered": 0, "copies": 0}
    if fused:
        slots, gc = fed.sampled_per_round(), m.gradient_checkpointing
        size = {r: kind_params(c, r) for r in {*ranks, lora.rank}}
        trained = max(sum(size[lora.rank][k] for k in method.trained(t)) for t in range(1, fed.rounds + 1))
        stacks, gathered = fused_bytes(c, lora.rank, slots, trained, moments, rows, a, gc)
        # A sampled client's state is copied twice more: the download cloned into what it received,
        # and the copy that trains (with its optimizer state). The largest, as the sample is drawn later.
        kinds = method.global_kinds
        copy = [4 * ((1 + kept) * sum(size[r].values()) + sum(size[r][k] for k in kinds)) for r in ranks]
        parts.update(stacks=stacks, gathered=gathered, copies=sum(sorted(copy)[-slots:]))
        states += parts["copies"]
        training = 4 * adapter * 2 + stacks + gathered  # plus the shared model's adapter and the initial one
    # A method that changes the base (FedEx-LoRA, FLoRA): the server's ΔW of every adapted layer
    # in fp32, kept with the client states, and W0 of those layers kept beside the changed weights.
    changed = sum(i * o for i, o in c["adapted"]) if BASE in method.global_kinds else 0
    parts["base_change"] = 4 * changed + storage * changed
    states += 4 * changed
    device_bytes = base + storage * changed + training + activations + (0 if gpu else states)
    host_bytes = states if gpu else 0

    d = c["dims"]
    rank_text = f"r={lora.rank}" if not lora.client_ranks else f"client ranks {min(ranks)}..{max(ranks)}"
    quant = "" if m.quantization == "none" else f", {m.quantization} ({QUANTIZED[m.quantization]})"
    lines = [
        f"model        {m.name_or_path} ({c['model_type']}): {_count(c['total'])} parameters, "
        f"{d['layers']} layers, hidden {d['hidden']}",
        f"adapter      LoRA {rank_text} on {', '.join(c['targets'])} ({len(c['adapted'])} layers): "
        f"{_count(adapter)} parameters" + (f" (head {_count(c['head'])})" if c["head"] else ""),
        f"base         {_fmt(base)} ({'fp32' if storage == 4 else precision} storage{quant})",
        f"training     {_fmt(training)}: adapter, gradients and initial copy in fp32"
        + (f", {moments} {train.optimizer} moment(s)" if moments else f", {train.optimizer} keeps no state")
        if not fused
        else f"training     {_fmt(training)}: fused engine, {_fmt(stacks)} for {slots} clients' adapters "
        f"stacked (+ gradients, {moments} {train.optimizer} moment(s)), {_fmt(gathered)} of their weights "
        "gathered per micro-batch, adapter and initial copy",
        f"one client   {_fmt(4 * (1 + kept) * adapter)} between rounds"
        + (f" (with its {train.optimizer} state)" if kept else " (its optimizer starts fresh each round)"),
        f"all clients  {_fmt(states)} for {fed.n_clients} clients"
        + (f" and 2 copies of each of the {slots} sampled in a round" if fused else "")
        + (" (pinned host memory on a GPU run)" if gpu else " (host memory)"),
        *(
            [f"base change  {_fmt(parts['base_change'])}: the server's ΔW (fp32), W0 of the changed weights"]
            if changed
            else []
        ),
        f"activations  {_fmt(act[False])} per micro-batch of {rows} x {length} tokens at "
        f"{precision}; {_fmt(act[True])} with gradient checkpointing"
        + (" (on)" if m.gradient_checkpointing else " (off)"),
    ]
    name, memory = None, 0.0
    with contextlib.suppress(RuntimeError, AssertionError):  # a CUDA device named but not present
        name, memory = device_memory(device)
    need = device_bytes + (GPU_RESERVE if gpu else 0)
    where = "GPU" if gpu else "host RAM"
    lines.append(
        f"needs        {_fmt(need)} on the {where}"
        + (f" (incl. {_fmt(GPU_RESERVE)} CUDA context), {_fmt(host_bytes)} in host memory" if gpu else "")
    )
    if name is None:
        lines.append(f"device       {device}: not found here, so whether it fits is not checked")
    else:
        fits = "fits" if need <= memory else f"does NOT fit (short by {_fmt(need - memory)})"
        lines.append(f"device       {name}: {_fmt(memory)}: {fits}")
    sampled = fed.sampled_per_round()
    up, down = traffic(c, method, ranks, fed.rounds, sampled)
    server = flower_server_bytes(up, down, sampled)
    host = device_memory("cpu")[1]
    behind = f"; a node that sat out rounds gets up to the whole ΔW, {_fmt(4 * changed)}" if changed else ""
    lines += [
        f"traffic      {_fmt(up)} up, {_fmt(down)} down per client per round (fp32); "
        f"{_fmt(sampled * (up + down))} per round for {sampled} clients{behind}",
        f"server side  {_fmt(server)} on Flower: a round's {sampled} downloads and replies held at once "
        "(SuperLink, and ServerApp with the replies decoded)"
        + (
            ""
            if server <= host
            else f": does NOT fit this host's {_fmt(host)}: lower federation.clients_per_round or lora.rank"
        ),
    ]
    return Plan(lines, device_bytes, host_bytes, parts)
