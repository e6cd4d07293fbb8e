"""The fused engine: the round's clients in lockstep, each local step one batched computation.

Local step t of every sampled client is one pass over all their step-t rows, sorted by
length across clients and cut into micro-batches of at most ``simulator.fused_tokens``
padded tokens: a round holds sentences of every length, so sorting across clients nearly
removes padding, and the frozen base layers see a few large batches instead of N small
ones. Each row goes through its own client's adapter (:mod:`sfedlora.engine.rowwise`); each
client's loss is the mean over its own rows (or tokens), as its own step would take it;
each client's gradient is measured, clipped and applied by its own optimizer
(:mod:`sfedlora.engine.stacked`). Clients with fewer local steps leave the lockstep when done.

What differs from the per-client engine is float summation order, and dropout: the masks
come from a stream seeded by the round's clients, reproducible but not the per-client
engine's (a mask depends on the batch it is drawn for).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..errors import SfedloraError
from ..federated.client import ClientOutcome, ClientState, LocalRound, kind_norms
from ..federated.jobs import EvalJob
from ..federated.kinds import split_base, tensor_kind
from ..federated.pruning import pruning_of
from ..federated.ranks import pad
from ..federated.shared import ClientSpec, Shared
from ..lora.base import set_base_change
from ..privacy.mechanisms import clip_per_example, noisy_mean
from .rowwise import PER_CLIENT, Rows, rowwise
from .stacked import StackedOptimizer

# A forward and backward pass costs about this many padded tokens beyond its rows (MiniLM on
# the 2-core CPU: see benchmarks/README.md, "Round engines").
MICRO_BATCH_OVERHEAD = 128


def micro_batches(lengths: np.ndarray, budget: int, overhead: int = MICRO_BATCH_OVERHEAD) -> list[np.ndarray]:
    """Indices of ``lengths`` sorted by length and cut into micro-batches of at most ``budget``
    padded tokens (rows × longest row; a longer row goes alone), where the cuts minimise the
    padded tokens plus ``overhead`` tokens' worth per micro-batch.

    Cutting greedily (fill each micro-batch to the budget) pads short rows to long ones: a
    step's rows come from clients' length groups drawn in random order, so they cluster, and
    the optimal cuts fall between the clusters (one dynamic programme over the sorted rows).
    """
    order = np.argsort(lengths, kind="stable")
    width = lengths[order].astype(np.int64)
    best = np.zeros(len(order) + 1)  # best[i]: least cost of the i shortest rows
    start = np.zeros(len(order) + 1, dtype=np.int64)  # where the last micro-batch of best[i] starts
    for i in range(1, len(order) + 1):
        first = max(0, i - max(1, budget // width[i - 1]))
        cost = best[first:i] + (i - np.arange(first, i)) * width[i - 1]
        j = int(np.argmin(cost))  # the first minimum: the largest micro-batch among equals
        best[i], start[i] = cost[j] + overhead, first + j
    cuts, i = [], len(order)
    while i:
        cuts.append(order[start[i] : i])
        i = start[i]
    return cuts[::-1]


def check_fused(shared: Shared) -> None:
    """Refuse what the fused engine cannot run yet, naming the engine that can."""
    if shared.compute.precision == "fp16":
        raise SfedloraError(
            f"the fused engine has no fp16 loss scaling: use model.precision=bf16, or {PER_CLIENT}"
        )
    if shared.method.personal_adapter:
        raise SfedloraError(
            f"the fused engine runs one adapter per client, {shared.method.name} two: {PER_CLIENT}"
        )
    if pruning_of(shared.cfg) is not None:
        raise SfedloraError(
            "the fused engine has no HetLoRA rank self-pruning (federation.hetlora_prune_decay): "
            f"{PER_CLIENT}"
        )
    # Every adapter tensor must have a row-by-row layer: try them on (nothing runs).
    with rowwise(shared.model, shared.params, Rows()):
        pass


def stack(shared: Shared, models: Sequence[tuple[dict, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The (tensors, client) ``models`` as stacked tensors at full rank, a slot each, and their γ."""
    full = []
    for tensors, _ in models:
        adapter, base = split_base(tensors)
        if base:  # the server's base change: the same for every model of a round
            set_base_change(shared.model, base)
        full.append(pad(adapter, shared.params))
    device = shared.compute.device
    stacks = {n: torch.stack([f[n] for f in full]).to(device) for n in shared.params}
    gammas = [shared.ranks.layer_gamma(k) for _, k in models]
    return stacks, torch.tensor(gammas, dtype=torch.float32, device=device)


class FusedRound:
    """One round of the fused engine over ``clients`` (spec, state, download) of ``shared``."""

    def __init__(self, shared: Shared, jobs: Sequence[tuple[ClientSpec, ClientState, dict]], round_: int):
        self.shared, self.round = shared, round_
        self.clients = [LocalRound(shared, spec, state, download) for spec, state, download in jobs]
        self.device = shared.compute.device
        trained_kinds = shared.method.trained(round_)
        self.names = list(shared.params)
        self.trained = [n for n in self.names if tensor_kind(n) in trained_kinds]
        self.stacks, self.gammas = stack(shared, [(c.state.tensors, c.client.k) for c in self.clients])
        # Each micro-batch trains a copy of the slots it holds (``live``) and adds its gradients
        # here: its backward then costs what its rows hold, not what all N clients hold.
        for n in self.trained:
            self.stacks[n].grad = torch.zeros_like(self.stacks[n])
        self.live = dict(self.stacks)
        self.optimizer = StackedOptimizer(shared.cfg.train, self.stacks, self.names)
        if shared.cfg.train.optimizer_state == "persistent":
            for slot, c in enumerate(self.clients):
                self.optimizer.load(slot, c.state.optimizer)
        self.pool = type(self.clients[0].client.data).concat([c.client.data for c in self.clients])
        sizes = [c.client.size for c in self.clients]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.lengths = self.pool.lengths()
        # DP-SGD: the clients' sums of clipped per-example gradients, noised at the step's end
        self.private = self.clients[0].client.dp is not None
        self.clipped = {n: torch.zeros_like(self.stacks[n]) for n in self.trained} if self.private else {}
        self.rows = Rows(samples={} if self.private else None)

    def run(self, budget: int) -> list[ClientOutcome]:
        model = self.shared.model
        # Dropout draws from the global stream: seed it from the round's clients, as each
        # client's own training seeds it from its stream.
        torch.manual_seed(int(np.random.SeedSequence([c.seed for c in self.clients]).generate_state(1)[0]))
        model.train()
        with rowwise(model, self.live, self.rows):
            for t in range(max(len(c.batches) for c in self.clients)):
                self._step(t, budget)
        return [self._outcome(slot, c) for slot, c in enumerate(self.clients)]

    def _step(self, t: int, budget: int) -> None:
        shared, task, compute, private = self.shared, self.shared.task, self.shared.compute, self.private
        active = [s for s, c in enumerate(self.clients) if t < len(c.batches)]
        slot_of = np.concatenate([np.full(len(self.clients[s].batches[t]), s) for s in active]).astype(
            np.int64
        )
        index = np.concatenate([self.offsets[s] + self.clients[s].batches[t] for s in active]).astype(
            np.int64
        )
        cuts = micro_batches(self.lengths[index], budget)
        owners = [torch.from_numpy(slot_of[mb]).to(self.device) for mb in cuts]
        batches = [self.pool.collate(index[mb], shared.tokenizer) for mb in cuts]
        # Each client's loss is its own rows' mean: weigh each row by its client's total count.
        totals = torch.zeros(len(self.clients), device=self.device)
        for owner, batch in zip(owners, batches):
            totals.index_add_(0, owner, task.row_counts(batch["labels"].to(self.device), private))
        loss_of = torch.zeros(len(self.clients), device=self.device)
        for owner, batch in zip(owners, batches):
            present = self._hold(owner)
            labels = batch.pop("labels").to(self.device)
            logits = compute.forward(shared.model, batch).logits
            losses = task.row_losses(logits, labels, private)
            # DP-SGD wants each row's own gradient unweighted, as it clips it before any mean.
            (losses if private else losses / totals[owner]).sum().backward()
            loss_of.index_add_(0, owner, (losses.detach() / totals[owner]).float())
            for n in self.trained:
                self.stacks[n].grad.index_add_(0, present, self.live[n].grad)
            if private:
                self._clip(owner)
        self._apply(torch.tensor(active, device=self.device), loss_of, set(slot_of.tolist()))

    def _hold(self, owner: torch.Tensor) -> torch.Tensor:
        """Give the layers the slots of ``owner``'s clients, as leaves of their own; return them."""
        present, local = torch.unique(owner, return_inverse=True)
        trained = set(self.trained)
        for n, full in self.stacks.items():
            self.live[n] = full.detach()[present].requires_grad_(n in trained)
        self.rows.set(local, self.gammas[owner])
        return present

    def _clip(self, owner: torch.Tensor) -> None:
        """Clip this micro-batch's per-example gradients, and add them to their clients' sums."""
        clip = self.clients[0].client.dp.clip_norm
        samples = {n: g.float() for n, g in self.rows.samples.items()}
        for n, g in clip_per_example(samples, clip).items():
            self.clipped[n].index_add_(0, owner, g)
        self.rows.samples.clear()

    def _noise(self, active: torch.Tensor) -> None:
        """Each active client's DP-SGD gradient from its clipped sum and its own noise stream."""
        shapes = {n: self.stacks[n].shape[1:] for n in self.trained}
        for s in active.tolist():
            c = self.clients[s]
            sums = {n: self.clipped[n][s].cpu() for n in self.trained}
            dp = c.client.dp
            private = noisy_mean(
                sums, shapes, dp.clip_norm, dp.noise_multiplier, dp.sample_rate * c.client.size, c.noise
            )
            for n in self.trained:
                self.stacks[n].grad[s] = private[n].to(self.device)
                self.clipped[n][s] = 0

    def _apply(self, active: torch.Tensor, loss_of: torch.Tensor, had_rows: set[int]) -> None:
        cfg = self.shared.cfg.train
        if self.private:
            self._noise(active)
        grads = {n: self.stacks[n].grad for n in self.trained}
        norms = kind_norms({n: g[active] for n, g in grads.items()})
        if cfg.max_grad_norm is not None and grads and not self.private:
            # torch's clip_grad_norm_, each client over its own gradient
            total = torch.stack([v for v in norms.values()]).pow(2).sum(0).sqrt()
            coef = (cfg.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
            for g in grads.values():
                g[active] *= coef.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype)
        lrs = []
        for i, s in enumerate(active.tolist()):
            # a Poisson batch may be empty: no loss, but the noise still steps
            loss = float(loss_of[s]) if s in had_rows else None
            lrs.append(self.clients[s].step(loss, {k: float(v[i]) for k, v in norms.items()}))
        self.optimizer.step(self.trained, active, torch.tensor(lrs, dtype=torch.float64, device=self.device))
        for g in grads.values():
            g.zero_()

    def _outcome(self, slot: int, c: LocalRound) -> ClientOutcome:
        c.finish(
            {n: s[slot].detach().clone() for n, s in self.stacks.items()},
            lambda: self.optimizer.state_dict(slot),
        )
        return c.outcome(self.shared, self.round)


def fused_round(
    shared: Shared, jobs: Sequence[tuple[ClientSpec, ClientState, dict]], round_: int
) -> Iterator[ClientOutcome]:
    """The client side of a round for all of ``jobs``: what :func:`sfedlora.federated.client.client_round`
    gives for each, up to float summation order (and dropout masks). At most
    ``simulator.fused_clients`` train together, so memory is bounded by that many clients'
    stacked state, not by N; each group's outcomes are yielded as it ends."""
    sim = shared.cfg.simulator
    for first in range(0, len(jobs), sim.fused_clients):
        yield from FusedRound(shared, jobs[first : first + sim.fused_clients], round_).run(sim.fused_tokens)


@torch.no_grad()
def fused_outputs(shared: Shared, models: Sequence[EvalJob]) -> list[np.ndarray]:
    """The logits of each job's model on its data, as the task's ``outputs`` gives them one
    model at a time: all models' rows sorted by length together and batched by the token
    budget; ``simulator.fused_clients`` models' tensors stacked at a time, so memory does not
    grow with N."""
    compute, rows, sim = shared.compute, Rows(), shared.cfg.simulator
    group, budget = sim.fused_clients, sim.fused_tokens
    out: list[np.ndarray] = []
    shared.model.eval()
    for first in range(0, len(models), group):
        chunk = models[first : first + group]
        datas = [shared.eval_data if m.data is None else m.data for m in chunk]
        stacks, gammas = stack(shared, [(m.tensors, m.client) for m in chunk])
        pool = type(datas[0]).concat(datas)
        sizes = [len(d) for d in datas]
        slot_of = np.repeat(np.arange(len(chunk)), sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        logits: np.ndarray | None = None
        with rowwise(shared.model, stacks, rows):
            for mb in micro_batches(pool.lengths(), budget):
                batch = pool.collate(mb, shared.tokenizer)
                batch.pop("labels")
                owner = torch.from_numpy(slot_of[mb]).to(compute.device)
                rows.set(owner, gammas[owner])
                values = compute.forward(shared.model, batch).logits.float().cpu().numpy()
                if logits is None:
                    logits = np.empty((len(pool), values.shape[-1]), dtype=np.float32)
                logits[mb] = values
        out.extend(logits[starts[i] : starts[i + 1]] for i in range(len(chunk)))
    return out
