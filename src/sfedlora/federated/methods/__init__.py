"""Federated LoRA methods: the :class:`Method` interface (:mod:`.method`) and the registry.

One module per method with code of its own; the methods that are policies over tensor
kinds alone share :mod:`.kind_policies`. A new method is a :class:`Method` (or a subclass
with its own :meth:`Method.aggregate`) in ``METHODS`` and a name in ``presets.PRESETS``.
"""

from __future__ import annotations

from ..kinds import KINDS, aggregate, select, tensor_kind
from .feddpa import FEDDPA
from .fedex_lora import FEDEX_LORA
from .flexlora import FLEXLORA
from .flora import FLORA
from .hetlora import HETLORA
from .kind_policies import FEDIT, FEDSA_LORA, FFA_LORA, ROLORA
from .method import Method, Replies
from .presets import PRESETS

METHODS: dict[str, Method] = {
    m.name: m for m in (FEDIT, FFA_LORA, FEDSA_LORA, ROLORA, FEDEX_LORA, FLORA, FLEXLORA, HETLORA, FEDDPA)
}


def get_method(name: str, local_head: bool = False, head_probe_rounds: int = 0) -> Method:
    try:
        method = METHODS[PRESETS[name][0]]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESETS)}") from None
    if local_head:
        method = method.with_local_head()
    return method.with_head_probe(head_probe_rounds) if head_probe_rounds else method


__all__ = [
    "KINDS",
    "METHODS",
    "PRESETS",
    "Method",
    "Replies",
    "aggregate",
    "get_method",
    "select",
    "tensor_kind",
]
