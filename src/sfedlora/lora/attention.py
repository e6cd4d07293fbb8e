"""Which attention implementation a forward pass runs: eager or SDPA, chosen per pass.

transformers runs SDPA (torch's ``scaled_dot_product_attention``) by default. On a CPU at
the short lengths of sentence classification its fused kernels cost more than the rest of
the step (profiled for issue 37: its backward took 36 % of the main job's step, more than
all the step's matmuls);
at long lengths the eager path's materialised (rows, heads, L, L) scores cost more. So
``model.attention: auto`` picks per device and the batch's padded length, by
:data:`EAGER_BELOW`, measured in bf16 and fp32 with ``benchmarks/bench_attention.py`` (benchmarks/README.md,
"Attention"). The model's attention layers read the implementation from its config at every
forward pass (transformers 5), so switching it between batches costs nothing.
"""

from __future__ import annotations

# CPU: the padded length below which eager attention trains faster than SDPA. One for both
# precisions: MiniLM's step was 1.1-1.25x faster eager in bf16 (1.07-1.2x in fp32) at 16-128
# tokens; the tiny LLaMA's 1.12x (bf16) to 1.6x (fp32) faster with SDPA at 256, 1.6-2.6x
# at 512-1024.
EAGER_BELOW = 256


def choose_attention(setting: str, device: str, length: int) -> str:
    """The implementation ``model.attention`` = ``setting`` gives a pass over ``length`` tokens."""
    if setting != "auto":
        return setting
    if not device.startswith("cpu"):
        return "sdpa"  # fused GPU kernels, and no (L, L) scores in memory
    return "eager" if length < EAGER_BELOW else "sdpa"


def use_attention(model, setting: str, device: str, length: int) -> None:
    """Make ``model`` (a PEFT model or a transformers one) run, from its next pass, the
    implementation ``model.attention`` = ``setting`` gives passes over ``length`` tokens."""
    implementation = choose_attention(setting, device, length)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    if config._attn_implementation != implementation:
        config._attn_implementation = implementation
