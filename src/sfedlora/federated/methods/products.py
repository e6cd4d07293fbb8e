"""What the methods that work on LoRA products share: each layer's pair of factors, the
weighted sum of the clients' products Σ p_k γ_k B_k A_k (each client at its own rank, under
its own γ_k) and its stacked factors, a change to a base weight in that weight's own
orientation, and the settings such methods refuse."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ...errors import SfedloraError
from ..catchup import Change, product
from ..kinds import BASE_SUFFIX, aggregate, select, tensor_kind
from .method import Replies

if TYPE_CHECKING:
    from ...config import RunConfig


def layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Each LoRA layer in ``tensors`` as its base weight's name → (A's name, B's name)."""
    out = {}
    for name in tensors:
        if ".lora_embedding_A." in name:
            raise SfedloraError(
                "LoRA on an embedding layer has no product this method can fold: "
                "leave embeddings out of lora.target_modules"
            )
        if tensor_kind(name) == "A":
            b = name.replace(".lora_A.", ".lora_B.")
            if b in tensors:
                out[name.split(".lora_A.")[0] + BASE_SUFFIX] = (name, b)
    return out


def head_mean(replies: Replies) -> dict[str, torch.Tensor]:
    """The task head's weighted mean over the replies (nothing where the head is not sent)."""
    heads = [select(u, frozenset({"head"})) for u in replies.updates]
    return aggregate(heads, replies.weights) if heads[0] else {}


def stacked(replies: Replies, a: str, b: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_k p_k γ_k B_k A_k as the factors U·diag(c)·V it stacks (FLoRA's stacked adapter):
    U = [B_1 … B_K], V = [A_1; …; A_K], c repeating p_k γ_k over client k's r_k columns."""
    ups, plan = replies.updates, replies.plan
    weights = [
        torch.full((u[a].shape[0],), p * plan.layer_gamma(k), dtype=torch.float64)
        for p, k, u in zip(replies.shares, replies.clients, ups)
    ]
    return torch.cat([u[b] for u in ups], 1), torch.cat(weights), torch.cat([u[a] for u in ups], 0)


def weighted_product(replies: Replies, a: str, b: str) -> torch.Tensor:
    """Σ_k p_k γ_k B_k A_k over the replies, in float64: each client's product at its own
    rank, under the γ_k its layers ran with."""
    return product(*stacked(replies, a, b))


def oriented(change: Change, key: str, transposed: frozenset[str]) -> Change:
    """A (d_out × d_in) change as a change to base weight ``key``: transposed for a Conv1D."""
    return change.T if key in transposed else change


def refuse_unsupported(cfg: RunConfig, name: str, mixed_ranks: bool, changes_base: bool = False) -> None:
    """What a method computing from each client's factors cannot run with."""
    if changes_base and cfg.model.quantization != "none":
        # W0 + ΔW cannot be stored in NF4 / int8 without losing ΔW: refused, not approximated.
        raise SfedloraError(
            f"{name} changes the base weights, which model.quantization={cfg.model.quantization} "
            "stores quantized: set model.quantization=none"
        )
    if cfg.privacy.secagg:
        raise SfedloraError(
            f"{name} computes from each client's own factors, which SecAgg+ hides from the server: "
            "set privacy.secagg=false"
        )
    if cfg.privacy.dp == "server":
        raise SfedloraError(
            f"{name} has its own server aggregation, which privacy.dp=server would replace by a noised "
            "mean: use privacy.dp=client"
        )
    if not mixed_ranks and cfg.lora.client_ranks is not None:
        raise SfedloraError(f"{name} needs one rank for every client: unset lora.client_ranks")
