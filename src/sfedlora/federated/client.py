"""One client's local training for one round: runtime-agnostic and free of I/O.

A client is its state (adapter tensors, optimizer state, RNG, step count); the model it
trains is borrowed: the caller's one shared base model with its adapter parameters,
into which the state is written before training and read back after.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import TrainConfig
from ..data.encoding import Encoded
from ..lora.base import set_base_change
from ..lora.models import Compute, read_tensors, write_tensors
from ..privacy.dpsgd import DPSGD, apply_private_gradient, per_example_gradients
from ..privacy.mechanisms import poisson_batches
from .kinds import split_base, tensor_kind
from .ranks import pad
from .shared import ClientSpec, Shared, client_steps, expected_steps


@dataclass
class ClientState:
    tensors: dict[str, torch.Tensor]  # this client's copy of every adapter tensor
    rng: torch.Tensor  # torch.Generator state: batch order and dropout
    # torch optimizer state_dict: kept across rounds with train.optimizer_state=persistent
    optimizer: dict | None = None
    steps: int = 0  # local steps taken so far; drives a persistent learning-rate schedule

    def state_dict(self) -> dict:
        """Plain tensors, dicts and numbers: what a checkpoint, a node's state file and a
        ClientApp's ``Context.state`` keep of a client (:meth:`from_state_dict` reads it)."""
        return {"tensors": self.tensors, "rng": self.rng, "optimizer": self.optimizer, "steps": self.steps}

    @classmethod
    def from_state_dict(cls, state: dict) -> ClientState:
        return cls(state["tensors"], state["rng"], state["optimizer"], int(state["steps"]))


@dataclass
class ClientResult:
    loss: float  # mean training loss over the round's steps
    steps: int
    # kind → mean L2 norm of its gradient (pre-clipping)
    grad_norm: dict[str, float] = field(default_factory=dict)
    examples: int = 0  # the client's training examples: its weight in the server's mean

    def stats(self) -> dict[str, float | int]:
        """As flat named numbers (a Flower MetricRecord); :meth:`from_stats` reads them back."""
        norms = {f"grad_norm.{k}": v for k, v in self.grad_norm.items()}
        return {"loss": self.loss, "steps": self.steps, "examples": self.examples, **norms}

    @classmethod
    def from_stats(cls, stats) -> ClientResult:
        norms = {
            k.removeprefix("grad_norm."): float(v) for k, v in stats.items() if k.startswith("grad_norm.")
        }
        return cls(float(stats["loss"]), int(stats["steps"]), norms, int(stats.get("examples", 0)))


def new_client_state(tensors: Mapping[str, torch.Tensor], seed: int) -> ClientState:
    g = torch.Generator().manual_seed(seed)
    return ClientState({n: t.clone() for n, t in tensors.items()}, g.get_state())


def offload_state(state: ClientState, compute: Compute) -> ClientState:
    """``state`` with its adapter tensors and optimizer state in host memory on a GPU run
    (:meth:`Compute.offload`): a client's state between its turns."""
    state.tensors, state.optimizer = compute.offload((state.tensors, state.optimizer))
    return state


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate of local step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _batch_indices(
    lengths: np.ndarray, batch_size: int, steps: int, g: torch.Generator, group_by_length: bool
) -> list[np.ndarray]:
    """``steps`` batches drawn without replacement, reshuffling when the data runs out.

    With ``group_by_length`` the round's draw is sorted by length before it is cut into
    batches (whose order is then shuffled), so little compute goes to padding.
    """
    n = len(lengths)
    bs = min(batch_size, n)
    need = steps * bs
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])[:need].numpy()
    if group_by_length:
        order = order[np.argsort(lengths[order], kind="stable")]
    batches = [order[i * bs : (i + 1) * bs] for i in range(steps)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(steps, generator=g).tolist()]
    return batches


def _kind_norms(params: Mapping[str, torch.nn.Parameter]) -> dict[str, float]:
    by_kind: dict[str, list[torch.Tensor]] = {}
    for n, p in params.items():
        if p.grad is not None:
            by_kind.setdefault(tensor_kind(n), []).append(p.grad.detach().pow(2).sum())
    return {k: float(torch.stack(v).sum().sqrt()) for k, v in by_kind.items()}


def train_client(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    state: ClientState,
    data: Encoded,  # or data.lm.LMEncoded: anything with lengths() and collate()
    tokenizer,
    trained_kinds: frozenset[str],
    steps: int,
    total_steps: int,
    cfg: TrainConfig,
    compute: Compute = Compute(),
    dp: DPSGD | None = None,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
) -> ClientResult:
    """Train ``steps`` local steps from ``state``; update ``state`` in place.

    Only tensors of ``trained_kinds`` receive gradients; the others stay as they were.
    With ``train.optimizer_state=fresh`` (the reference's) the optimizer and the learning-rate
    schedule start anew: no moments from earlier rounds, the schedule spans these ``steps``;
    with ``persistent`` both carry on from ``state``, the schedule spanning ``total_steps``,
    the client's step count over the whole run.
    With ``dp`` each step is a DP-SGD step: Poisson-sampled batches, per-example
    clipping and Gaussian noise instead of ``cfg.max_grad_norm``; the reported gradient
    norms are then those of the private gradients. ``loss_fn(model, batch)`` is the task's
    loss (:meth:`sfedlora.tasks.Task.loss`); by default the model's own.
    """
    loss_fn = loss_fn or (lambda m, batch: compute.forward(m, batch).loss)
    write_tensors(params, state.tensors)
    ordered = list(params.values())
    for n, p in params.items():
        p.requires_grad_(tensor_kind(n) in trained_kinds)
    persistent = cfg.optimizer_state == "persistent"
    optimizer = make_optimizer(ordered, cfg)
    if persistent and state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    g = torch.Generator().manual_seed(0)
    g.set_state(state.rng)
    # Dropout draws from the global RNG: seed it from the client's own generator so a
    # client's randomness does not depend on which clients trained before it.
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))

    model.train()
    # fp16 activations underflow small gradients: scale the loss up, and the gradients back
    # down before they are measured, clipped or applied (a step with inf/nan is skipped).
    scaler = torch.amp.GradScaler(torch.device(compute.device).type, enabled=compute.precision == "fp16")
    losses, norms = [], []
    if dp is None:
        batches = _batch_indices(data.lengths(), cfg.batch_size, steps, g, cfg.group_by_length)
    else:
        batches = poisson_batches(len(data), dp.sample_rate, steps, g)
        noise_g = dp.noise_generator(g)
    with contextlib.nullcontext() if dp is None else per_example_gradients(model):
        for i, idx in enumerate(batches):
            if len(idx):  # a Poisson batch may be empty: its DP gradient is noise alone
                batch = data.collate(idx, tokenizer)
                loss = loss_fn(model, batch)
                scaler.scale(loss).backward()
                losses.append(float(loss.detach()))
            scaler.unscale_(optimizer)
            if dp is not None:
                apply_private_gradient(params, dp, dp.sample_rate * len(data), noise_g)
            norms.append(_kind_norms(params))
            if dp is None and cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in ordered if p.grad is not None], cfg.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.steps, total_steps, cfg) if persistent else lr_at(i, steps, cfg)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.steps += 1

    state.tensors = read_tensors(params)
    state.optimizer = optimizer.state_dict() if persistent else None
    state.rng = g.get_state()
    kinds = sorted({k for n in norms for k in n})
    return ClientResult(
        loss=float(np.mean(losses)) if losses else 0.0,  # 0.0: every Poisson batch came out empty
        steps=len(batches),
        grad_norm={k: float(np.mean([n[k] for n in norms])) for k in kinds},
    )


@dataclass
class ClientOutcome:
    """What one client's round leaves behind: its next state, and what it sends (if anything)."""

    state: ClientState
    result: ClientResult | None  # None: the loss turned non-finite, so nothing is sent
    update: dict[str, torch.Tensor]  # what the method uploads; empty when result is None


def client_round(
    shared: Shared, client: ClientSpec, state: ClientState, download: dict[str, torch.Tensor], round_: int
) -> ClientOutcome:
    """Client side of a round, for every runtime: take the download, train, pick the upload.

    ``state`` itself is left untouched. If the loss turns non-finite, the outcome's state
    is ``state`` with the download but without the training, and nothing is sent.
    """
    cfg, k = shared.cfg, client.k
    # The server's change to the base weights (methods that own one) goes into the shared
    # model, never into the client's state.
    download, base = split_base(download)
    received = ClientState(
        {**state.tensors, **{n: t.clone() for n, t in download.items()}},
        state.rng,
        state.optimizer,
        state.steps,
    )
    # Optimizer state is updated in place while training: train a copy, keep ``received`` intact.
    trained = copy.deepcopy(received)
    # The shared model runs at full rank: train the client's rank-r_k adapter zero-padded,
    # under its own γ; the padding gets zero gradients and is cut off again below.
    trained.tensors = pad(trained.tensors, shared.params)
    shared.ranks.use(shared.model, k)
    set_base_change(shared.model, base)
    result = train_client(
        shared.model,
        shared.params,
        trained,
        client.data,
        shared.tokenizer,
        shared.method.trained(round_),
        client_steps(cfg, client.size),
        expected_steps(cfg, client.size),
        cfg.train,
        shared.compute,
        client.dp,
        # Under DP-SGD each example's gradient must be its own, whatever else is in the batch.
        functools.partial(shared.task.loss, compute=shared.compute, per_example=client.dp is not None),
    )
    result.examples = client.size
    if not np.isfinite(result.loss):
        return ClientOutcome(offload_state(received, shared.compute), None, {})
    trained.tensors = shared.ranks.view(trained.tensors, k)
    trained = offload_state(trained, shared.compute)
    return ClientOutcome(trained, result, shared.method.upload(trained.tensors, round_))
