"""One client's local training for one round: runtime-agnostic and free of I/O.

A client is its state (adapter tensors, optimizer state, RNG, step count); the model it
trains is borrowed: the caller's one shared base model with its adapter parameters,
into which the state is written before training and read back after.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import TrainConfig
from ..lora.base import set_base_change
from ..lora.models import Compute, read_tensors, write_tensors
from ..privacy.dpsgd import apply_private_gradient, per_example_gradients
from ..privacy.mechanisms import poisson_batches
from .kinds import split_base, tensor_kind
from .pruning import pruning_of
from .ranks import pad, truncate
from .shared import ClientSpec, Shared, client_steps, expected_steps


@dataclass
class ClientState:
    tensors: dict[str, torch.Tensor]  # this client's copy of every adapter tensor
    rng: torch.Tensor  # torch.Generator state: batch order and dropout
    # torch optimizer state_dict: kept across rounds with train.optimizer_state=persistent
    optimizer: dict | None = None
    steps: int = 0  # local steps taken so far; drives a persistent learning-rate schedule
    # its rank once HetLoRA's self-pruning (:mod:`.pruning`) cut it; None: the rank plan's
    rank: int | None = None

    def state_dict(self) -> dict:
        """Plain tensors, dicts and numbers: what a checkpoint, a node's state file and a
        ClientApp's ``Context.state`` keep of a client (:meth:`from_state_dict` reads it)."""
        return dict(vars(self))  # tensors, rng, optimizer, steps, rank

    def with_download(self, download: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Its tensors with the server's ``download`` on top, cut to its rank where it pruned."""
        return {**self.tensors, **(download if self.rank is None else truncate(download, self.rank))}

    @classmethod
    def from_state_dict(cls, state: dict) -> ClientState:
        # States saved before pruning existed have no rank: the plan's.
        return cls(state["tensors"], state["rng"], state["optimizer"], int(state["steps"]), state.get("rank"))


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


def kind_norms(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per kind, each client's L2 gradient norm (pre-clipping), from ``grads``: name → the
    clients' gradients stacked (client, *shape)."""
    sq: dict[str, torch.Tensor] = {}
    for n, g in grads.items():
        k = tensor_kind(n)
        sq[k] = sq.get(k, 0) + g.detach().float().pow(2).flatten(1).sum(1)
    return {k: v.sqrt() for k, v in sq.items()}


class LocalRound:
    """One client's local training in a round, whatever computes its steps' gradients: the
    download taken, its random stream, batch plan, learning rates, reported losses and
    gradient norms, and the outcome it leaves. Both engines drive it: :func:`train_client`
    one client at a time, the fused engine (:mod:`sfedlora.engine.fused`) many in lockstep;
    they differ only in how a step's rows are computed.

    With ``train.optimizer_state=fresh`` (the reference's) the optimizer and the learning-rate
    schedule start anew: no moments from earlier rounds, the schedule spans this round's
    steps; with ``persistent`` both carry on from the state, the schedule spanning the
    client's steps over the whole run. With the client's ``dp`` the batches are
    Poisson-sampled and ``noise`` is its DP-SGD noise stream. A round trained in phases
    (:meth:`sfedlora.federated.methods.Method.phases`) is one ``LocalRound`` per phase, each
    after the ``earlier`` one: its own batches, optimizer and schedule, one report and one
    fallback (the state as received) for the whole round.
    """

    def __init__(
        self,
        shared: Shared,
        client: ClientSpec,
        state: ClientState,
        download: dict[str, torch.Tensor],
        earlier: LocalRound | None = None,
    ):
        cfg = shared.cfg
        self.client, self.cfg = client, cfg.train
        # The server's change to the base weights (methods that own one) goes into the shared
        # model, never into the client's state.
        download, base = split_base(download)
        set_base_change(shared.model, base)
        self.rank = state.rank or shared.ranks.rank_of(client.k)
        received = state.with_download({n: t.clone() for n, t in download.items()})
        # What it keeps if its loss turns non-finite: the download, without the training.
        self.received = earlier.received if earlier else dataclasses.replace(state, tensors=received)
        self.phases: list[LocalRound] = [*(earlier.phases if earlier else []), self]
        # The copy that trains; its tensors are only read (written into a model or stacked),
        # its optimizer state is updated in place.
        self.state = dataclasses.replace(
            state, tensors=dict(received), optimizer=copy.deepcopy(state.optimizer)
        )
        self.persistent = cfg.train.optimizer_state == "persistent"
        self.total = expected_steps(cfg, client.size)
        self.generator = g = torch.Generator().manual_seed(0)
        g.set_state(state.rng)
        # Dropout draws from the global stream, which the engine seeds from this, so a
        # client's randomness does not depend on which clients trained before it.
        self.seed = int(torch.randint(2**62, (1,), generator=g))
        steps, dp = client_steps(cfg, client.size), client.dp
        if dp is None:
            self.batches = _batch_indices(
                client.data.lengths(), cfg.train.batch_size, steps, g, cfg.train.group_by_length
            )
        else:
            self.batches = poisson_batches(client.size, dp.sample_rate, steps, g)
        self.noise = None if dp is None else dp.noise_generator(g)
        self.losses: list[float] = []
        self.norms: list[dict[str, float]] = []

    def step(self, loss: float | None, norms: dict[str, float]) -> float:
        """Record a step's mean loss (None: its Poisson batch was empty) and its kinds'
        gradient norms; return the learning rate to apply it with."""
        if loss is not None:
            self.losses.append(loss)
        self.norms.append(norms)
        taken = len(self.norms) - 1
        lr = (
            lr_at(self.state.steps, self.total, self.cfg)
            if self.persistent
            else lr_at(taken, len(self.batches), self.cfg)
        )
        self.state.steps += 1
        return lr

    def finish(self, tensors: dict[str, torch.Tensor], optimizer: Callable[[], dict]) -> None:
        """The state takes the trained ``tensors`` (at full rank), the ``optimizer``'s state
        (kept only when persistent) and the stream where it stands."""
        self.state.tensors = tensors
        self.state.optimizer = optimizer() if self.persistent else None
        self.state.rng = self.generator.get_state()

    def result(self) -> ClientResult:
        """The round's report, over all its phases."""
        losses = [x for p in self.phases for x in p.losses]
        norms = [n for p in self.phases for n in p.norms]
        kinds = sorted({k for n in norms for k in n})
        # 0.0 when every Poisson batch came out empty
        return ClientResult(
            loss=float(np.mean(losses)) if losses else 0.0,
            steps=sum(len(p.batches) for p in self.phases),
            grad_norm={k: float(np.mean([n[k] for n in norms if k in n])) for k in kinds},
            examples=self.client.size,
        )

    def outcome(self, shared: Shared, round_: int) -> ClientOutcome:
        """What the finished round leaves: the state cut to the client's rank and its upload,
        or, if the loss turned non-finite, the received state and nothing sent."""
        result = self.result()
        if not np.isfinite(result.loss):
            return ClientOutcome(offload_state(self.received, shared.compute), None, {})
        state = self.state
        state.tensors = truncate(shared.ranks.view(state.tensors, self.client.k), state.rank or self.rank)
        state = offload_state(state, shared.compute)
        return ClientOutcome(state, result, shared.method.upload(state.tensors, round_))


@dataclass
class ClientOutcome:
    """What one client's round leaves behind: its next state, and what it sends (if anything)."""

    state: ClientState
    result: ClientResult | None  # None: the loss turned non-finite, so nothing is sent
    update: dict[str, torch.Tensor]  # what the method uploads; empty when result is None


def train_client(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    run: LocalRound,
    tokenizer,
    trained_kinds: frozenset[str],
    compute: Compute = Compute(),
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> ClientResult:
    """Train ``run``'s steps on ``model``, whose adapter ``params`` take the state's tensors.

    Only tensors of ``trained_kinds`` receive gradients; the others stay as they were.
    Under DP-SGD each step clips per example and adds noise instead of ``max_grad_norm``;
    the reported gradient norms are then those of the private gradients. ``loss_fn(model,
    batch)`` is the task's loss (:meth:`sfedlora.tasks.Task.loss`); by default the model's own.
    ``penalty()``, a regulariser of the parameters alone, adds its gradient to each step's
    after DP-SGD's (it reads no data, so it costs no privacy) and is not in the reported loss.
    """
    loss_fn = loss_fn or (lambda m, batch: compute.forward(m, batch).loss)
    cfg, data, dp = run.cfg, run.client.data, run.client.dp
    write_tensors(params, run.state.tensors)
    ordered = list(params.values())
    for n, p in params.items():
        p.requires_grad_(tensor_kind(n) in trained_kinds)
    optimizer = make_optimizer(ordered, cfg)
    if run.persistent and run.state.optimizer is not None:
        optimizer.load_state_dict(run.state.optimizer)
    torch.manual_seed(run.seed)

    model.train()
    # fp16 activations underflow small gradients: scale the loss up, and the gradients back
    # down before they are measured, clipped or applied (a step with inf/nan is skipped).
    scaler = torch.amp.GradScaler(torch.device(compute.device).type, enabled=compute.precision == "fp16")
    with contextlib.nullcontext() if dp is None else per_example_gradients(model):
        for idx in run.batches:
            loss = None
            if len(idx):  # a Poisson batch may be empty: its DP gradient is noise alone
                out = loss_fn(model, data.collate(idx, tokenizer))
                scaler.scale(out).backward()
                loss = float(out.detach())
            scaler.unscale_(optimizer)
            if dp is not None:
                apply_private_gradient(params, dp, dp.sample_rate * run.client.size, run.noise)
            extra = penalty() if penalty is not None else None
            if extra is not None and extra.requires_grad:  # not while only the head trains
                extra.backward()
            grads = {n: p.grad.unsqueeze(0) for n, p in params.items() if p.grad is not None}
            lr = run.step(loss, {k: float(v[0]) for k, v in kind_norms(grads).items()})
            if dp is None and cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in ordered if p.grad is not None], cfg.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    run.finish(read_tensors(params), optimizer.state_dict)
    return run.result()


def client_round(
    shared: Shared, client: ClientSpec, state: ClientState, download: dict[str, torch.Tensor], round_: int
) -> ClientOutcome:
    """Client side of a round, for every runtime: take the download, train, pick the upload.

    ``state`` itself is left untouched. If the loss turns non-finite, the outcome's state
    is ``state`` with the download but without the training, and nothing is sent. A method
    that trains in phases (FedDPA) runs them one after another, each from the state the
    earlier one left, under its own mix of the model's adapters.
    """
    rule = pruning_of(shared.cfg)
    run = before = None
    for phase in shared.method.phases(round_, shared.cfg):
        run = LocalRound(shared, client, run.state if run else state, download, run)
        # The shared model runs at full rank: train the client's rank-r_k adapter zero-padded,
        # under its own γ; the padding gets zero gradients and is cut off again by the outcome.
        run.state.tensors = pad(run.state.tensors, shared.params)
        shared.ranks.use(shared.model, client.k, phase.mix)
        if rule is not None and before is None:  # HetLoRA's pruning: the tail as received
            before = float(rule.tail(run.state.tensors, run.rank))
        train_client(
            shared.model,
            shared.params,
            run,
            shared.tokenizer,
            phase.trained,
            shared.compute,
            # Under DP-SGD each example's gradient must be its own, whatever else is in the batch.
            functools.partial(shared.task.loss, compute=shared.compute, per_example=client.dp is not None),
            None if rule is None else functools.partial(rule.penalty, shared.params, run.rank),
        )
    if rule is not None:
        run.state.rank = rule.rank_after(before, run.state.tensors, run.rank, run.state.rank)
    return run.outcome(shared, round_)
