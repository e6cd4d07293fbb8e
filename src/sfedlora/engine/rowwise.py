"""Every row of a batch through its own client's adapter: the layers of the fused engine.

Inside :func:`rowwise` the shared model runs many clients at once. Each client's adapter
tensors are one slot of a stacked tensor (slot, *shape); each row of a batch gathers its
client's slot, and two ``torch.bmm`` apply it, so the frozen base layers see one large batch
of every client's rows. The backward of the gather adds each row's gradient into its own
client's slot only, so clients' gradients stay apart exactly as if each had run alone.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import SfedloraError

PER_CLIENT = "set simulator.engine=per-client"


@dataclass
class Rows:
    """Whose rows a batch holds: set before each forward pass."""

    slot: torch.Tensor | None = None  # (rows,) the slot of each row's client
    gamma: torch.Tensor | None = None  # (rows, 1, 1) each row's client's γ
    # When a dict (DP-SGD): after backward, stack name → each row's own gradient of it
    samples: dict[str, torch.Tensor] | None = None

    def set(self, slot: torch.Tensor, gamma: torch.Tensor) -> None:
        self.slot, self.gamma = slot, gamma.reshape(-1, 1, 1)

    def take(self, name: str, stack: torch.Tensor | None) -> torch.Tensor | None:
        """Each row's slot of ``stack``. The gradient of what a row takes is that row's own
        (its per-example gradient, which DP-SGD clips): kept when ``samples`` asks."""
        if stack is None:
            return None
        taken = _Gather.apply(stack, self.slot) if stack.requires_grad else stack[self.slot]
        if self.samples is not None and stack.requires_grad:
            taken.register_hook(functools.partial(self.samples.__setitem__, name))
        return taken


class _Gather(torch.autograd.Function):
    """``stack[slot]`` whose backward adds each row's gradient into its slot with one
    ``index_add_`` (autograd's own scatters through a slower accumulate-put)."""

    @staticmethod
    def forward(ctx, stack: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slot)
        ctx.shape = stack.shape
        return stack[slot]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slot,) = ctx.saved_tensors
        out = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
        return out.index_add_(0, slot, grad.contiguous()), None


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with each row's own weight: ``x`` (rows, ..., d_in), ``weight`` (rows, d_out, d_in)."""
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    out = torch.bmm(rows, weight.transpose(1, 2))
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _lora_forward(self, x, *args, a: str, b: str, stacks: Mapping, rows: Rows, adapter: str, **kwargs):
    # PEFT's vanilla LoRA forward, with γ, A and B each row's own.
    result = self.base_layer(x, *args, **kwargs)
    x = self._cast_input_dtype(x, stacks[a].dtype)
    down = rowwise_linear(self.lora_dropout[adapter](x), rows.take(a, stacks[a]), None)
    delta = rowwise_linear(down, rows.take(b, stacks[b]), None)
    gamma = rows.gamma.reshape(-1, *([1] * (delta.dim() - 1)))
    return (result + delta * gamma).to(result.dtype)


def segment_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slot: torch.Tensor):
    """``F.linear`` of 2-D ``x`` with each row's own weight, one matmul per client present: a
    head's weights (d x d) cost more to gather per row than the matmuls they feed."""
    order = torch.argsort(slot, stable=True)
    present, counts = torch.unique_consecutive(slot[order], return_counts=True)
    weights = weight.unbind(0)  # one gradient buffer for all slots, not one per client
    biases = bias.unbind(0) if bias is not None else None
    outs = [
        torch.nn.functional.linear(part, weights[c], None if biases is None else biases[c])
        for part, c in zip(x[order].split(counts.tolist()), present.tolist())
    ]
    return torch.cat(outs)[torch.argsort(order)]


def _linear_forward(self, x, *, weight: str, bias: str | None, stacks: Mapping, rows: Rows):
    if x.dim() == 2 and rows.samples is None:  # DP-SGD needs each row's own gradient: gather
        return segment_linear(x, stacks[weight], stacks.get(bias), rows.slot)
    return rowwise_linear(x, rows.take(weight, stacks[weight]), rows.take(bias, stacks.get(bias)))


def _patch(module: torch.nn.Module, fn, **bound) -> None:
    def forward(self, *args, **kwargs):
        return fn(self, *args, **bound, **kwargs)

    module.forward = types.MethodType(forward, module)


@contextmanager
def rowwise(model: torch.nn.Module, stacks: Mapping[str, torch.Tensor], rows: Rows) -> Iterator[None]:
    """Within the block, ``model``'s LoRA layers and trained head Linears use ``stacks``
    (PEFT parameter name → (slots, *shape)) row by row, as ``rows`` says.

    Every stacked tensor must be used; an adapter of another shape (a LoRA embedding, a head
    with a LayerNorm, DoRA) is refused with the setting that runs it.
    """
    from peft.tuners.lora import Linear as LoraLinear

    used: set[str] = set()
    patched: list[torch.nn.Module] = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                (adapter,) = module.active_adapters
                if module.lora_variant.get(adapter) is not None:
                    raise SfedloraError(
                        f"the fused engine runs plain LoRA, not {name}'s variant: {PER_CLIENT}"
                    )
                a, b = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
                _patch(module, _lora_forward, a=a, b=b, stacks=stacks, rows=rows, adapter=adapter)
                used |= {a, b}
                patched.append(module)
            elif isinstance(module, torch.nn.Linear) and f"{name}.weight" in stacks and ".lora_" not in name:
                w, bias = f"{name}.weight", f"{name}.bias"
                has_bias = module.bias is not None
                _patch(
                    module,
                    _linear_forward,
                    weight=w,
                    bias=bias if has_bias else None,
                    stacks=stacks,
                    rows=rows,
                )
                used |= {w, bias} if has_bias else {w}
                patched.append(module)
        unused = sorted(set(stacks) - used)
        if unused:
            raise SfedloraError(
                f"the fused engine cannot apply {unused[0]} row by row (only LoRA on Linear layers and "
                f"Linear heads): {PER_CLIENT}"
            )
        yield
    finally:
        for module in patched:
            del module.forward
