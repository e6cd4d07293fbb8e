"""The embedded runtime: one frozen base model in memory, per-client adapter state, the round loop."""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .client import ClientResult, ClientState, new_client_state, steps_per_round, train_client
from .config import RunConfig
from .data import CAUSAL_LM, LM_TASKS, TaskData, encode_lm, label_histograms, partition
from .data.encoding import encode
from .errors import SfedloraError
from .evaluation import label_mix_accuracy, predict, summarise, task_metrics
from .lm_eval import lm_scores
from .methods import Method, get_method, select
from .models import (
    Compute,
    build_causal_lm,
    build_classifier,
    enable_gradient_checkpointing,
    read_tensors,
    trainable_parameters,
)
from .privacy import DPSGD, PrivacyPlan, plan_privacy, user_level_mean
from .ranks import RankPlan, pad
from .robust import change_norm, check_update, corrupt, norm_outliers
from .tiny_llama import TINY_LLAMA, tiny_llama_dir
from .workers import ClientWorkers, run_clients, worker_count

log = logging.getLogger("sfedlora")


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Federation:
    """Everything a run needs, built once from the config: model, data split, clients, server."""

    cfg: RunConfig
    method: Method
    model: torch.nn.Module
    tokenizer: object
    params: dict[str, torch.nn.Parameter]
    initial: dict[str, torch.Tensor]  # the adapter at initialisation, identical on every client
    server: dict[str, torch.Tensor]  # latest aggregate of every global tensor
    clients: list[ClientState]
    client_data: list  # Encoded (LMEncoded for a causal LM) training data of each client
    client_sizes: np.ndarray
    histograms: np.ndarray  # label counts per client
    eval_data: object  # Encoded, or LMEncoded
    num_labels: int  # 0 (CAUSAL_LM): a causal LM
    metric: str
    ranks: RankPlan  # each client's LoRA rank and γ
    compute: Compute
    sampler: np.random.Generator  # which clients take part in each round
    fault_rng: np.random.Generator  # injected faults (drop-outs, bad updates), apart from sampling
    round: int = 0  # rounds completed
    privacy: PrivacyPlan | None = None  # the DP mechanism (None without DP)
    dp_ledger: np.ndarray | None = (
        None  # DP steps (dp=client) or releases (dp=server) each client is charged for
    )
    dp_rng: np.random.Generator | None = None  # the server's DP noise (dp=server)

    @property
    def n_sampled(self) -> int:
        return self.cfg.federation.sampled_per_round()

    @property
    def gamma(self) -> float:
        """γ of the global model (with mixed ranks each client has its own: ``ranks.gammas``)."""
        return self.ranks.global_gamma

    def download(self, k: int) -> dict[str, torch.Tensor]:
        """What the server sends client ``k``: the global tensors, cut to the client's rank."""
        return self.ranks.view(self.method.download(self.server), k)

    def personal_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Client ``k``'s model: its own tensors with the server's global ones on top."""
        return {**self.clients[k].tensors, **self.ranks.view(self.server, k)}

    def client_models_differ(self) -> bool:
        """Whether clients' models differ: local tensors, or each client at its own rank."""
        return self.method.has_local_state() or self.ranks.mixed

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.initial, **self.server}

    @functools.cached_property
    def evaluated_clients(self) -> list[int]:
        """The clients whose personalised models are scored: every client, or ``eval.clients``
        of them drawn once from the seed (its own stream, so sampling and faults are unchanged)."""
        n, k = len(self.clients), self.cfg.eval.clients
        if k is None or k >= n:
            return list(range(n))
        return sorted(int(i) for i in np.random.default_rng([self.cfg.seed, 4]).choice(n, k, replace=False))


def split_clients(cfg: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's training-example indices, as the config's partition asks."""
    p = cfg.partition
    if p.kind == "dirichlet" and cfg.data.task in LM_TASKS:
        raise SfedloraError(
            f"partition.kind=dirichlet splits by label, and {cfg.data.task} has no labels: "
            "use partition.kind=iid, or size for clients of unequal size"
        )
    return partition(labels, cfg.federation.n_clients, p.kind, p.beta, p.min_size, cfg.seed)


def build_model(cfg: RunConfig, data: TaskData, compute: Compute, n_sampled: int):
    """The base model with its LoRA adapter, and its tokenizer: a causal LM for gsm8k/alpaca, else a classifier."""
    m, lora = cfg.model, cfg.lora
    if data.num_labels != CAUSAL_LM:
        return build_classifier(
            m.name_or_path,
            data.num_labels,
            lora.rank,
            lora.alpha,
            cfg.scaling,
            n_sampled,
            dropout=lora.dropout,
            target_modules=m.target_modules,
            seed=cfg.seed,
        )
    name = m.name_or_path
    if name == TINY_LLAMA:
        name = str(tiny_llama_dir(data.train.prompts + data.train.targets))
    return build_causal_lm(
        name,
        lora.rank,
        lora.alpha,
        cfg.scaling,
        n_sampled,
        dropout=lora.dropout,
        target_modules=m.target_modules,
        lora_mlp=m.lora_mlp,
        dtype=compute.base_dtype,
        seed=cfg.seed,
    )


def encode_split(data: TaskData, split: str, tokenizer, max_length: int):
    """The training or evaluation split, tokenised once: Encoded, or LMEncoded for a causal LM."""
    examples = data.train if split == "training" else data.eval
    if data.num_labels == CAUSAL_LM:
        return encode_lm(examples, tokenizer, max_length, split)
    return encode(examples, tokenizer, max_length)


def build_federation(cfg: RunConfig, data: TaskData) -> Federation:
    method = get_method(
        cfg.method, local_head=cfg.federation.local_head, head_probe_rounds=cfg.federation.head_probe_rounds
    )
    if method.has_local_state() and not cfg.eval.personalised:
        raise SfedloraError(
            f"eval.personalised=false leaves nothing to evaluate: {cfg.method} has no global model "
            "(its clients keep local tensors); set eval.personalised=true"
        )
    if cfg.eval.judged_on == "local" and (data.num_labels < 2 or not cfg.eval.personalised):
        raise SfedloraError(
            "eval.judged_on=local needs a classification task and eval.personalised=true "
            "(it scores each client's personalised model under its own label mix); use judged_on=dev"
        )
    fed = cfg.federation
    parts = split_clients(cfg, data.train.labels)
    n_sampled = fed.sampled_per_round()
    if data.num_labels == CAUSAL_LM and fed.head_probe_rounds:
        raise SfedloraError(
            "federation.head_probe_rounds trains a task head, and a causal LM has none: set it to 0"
        )
    compute = Compute.resolve(cfg.model.device, cfg.model.precision)
    model, tokenizer = build_model(cfg, data, compute, n_sampled)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(compute.device)
    params = trainable_parameters(model)
    initial = read_tensors(params)
    ranks = RankPlan.build(
        cfg.scaling, cfg.lora.alpha, cfg.lora.rank, cfg.lora.client_ranks, fed.n_clients, n_sampled
    )
    train_enc = encode_split(data, "training", tokenizer, cfg.model.max_length)
    client_data = [train_enc.subset(p) for p in parts]
    sizes = np.array([len(p) for p in parts])
    plan = plan_privacy(cfg, sizes, np.array([client_steps(cfg, int(n)) for n in sizes]))
    # With secure_noise the server's noise is seeded by the OS, so the config cannot replay it.
    dp_rng = np.random.default_rng(None if cfg.privacy.secure_noise else [cfg.seed, 3])
    return Federation(
        cfg=cfg,
        method=method,
        model=model,
        tokenizer=tokenizer,
        params=params,
        initial=initial,
        server=select(initial, method.global_kinds),
        clients=[
            new_client_state(ranks.view(initial, k), seed=cfg.seed * 100_003 + k + 1)
            for k in range(fed.n_clients)
        ],
        client_data=client_data,
        client_sizes=sizes,
        histograms=label_histograms(data.train.labels, parts, data.num_labels),
        eval_data=encode_split(data, "evaluation", tokenizer, cfg.model.max_length),
        num_labels=data.num_labels,
        metric=data.metric,
        ranks=ranks,
        compute=compute,
        sampler=np.random.default_rng([cfg.seed, 1]),
        fault_rng=np.random.default_rng([cfg.seed, 2]),
        privacy=plan,
        dp_ledger=np.zeros(len(parts), dtype=np.int64),
        dp_rng=dp_rng,
    )


def client_steps(cfg: RunConfig, n_examples: int) -> int:
    """Local steps a client with ``n_examples`` takes in a round it is sampled in."""
    return steps_per_round(
        n_examples, cfg.train.batch_size, cfg.federation.local_steps, cfg.federation.local_epochs
    )


def client_dp(fed: Federation, k: int) -> DPSGD | None:
    """Client ``k``'s DP-SGD settings, or None unless dp=client."""
    plan = fed.privacy
    if plan is None or plan.mode != "client":
        return None
    return DPSGD(
        plan.clip_norm,
        float(plan.noise_multiplier[k]),
        float(plan.sample_rate[k]),
        fed.cfg.privacy.secure_noise,
    )


def outputs_of(fed: Federation, tensors: dict[str, torch.Tensor], k: int | None = None):
    """What the shared model under client ``k``'s ``tensors`` (None: the global model's)
    produces on the dev set: logits for a classifier (scored by :func:`task_scores`); for a
    causal LM, its scores already (loss, perplexity and, for GSM8K, exact-match accuracy of
    greedy answers), which need the model itself."""
    fed.ranks.load(fed.model, fed.params, tensors, k)
    e = fed.cfg.eval
    if fed.num_labels == CAUSAL_LM:
        return lm_scores(fed.model, fed.eval_data, fed.tokenizer, e.batch_size, e.max_new_tokens, fed.compute)
    return predict(fed.model, fed.eval_data, fed.tokenizer, e.batch_size, fed.compute)


def task_scores(fed: Federation, outputs) -> dict[str, float]:
    """The task's metrics of one model's :func:`outputs_of`."""
    if fed.num_labels == CAUSAL_LM:
        return dict(outputs)
    return task_metrics(outputs, fed.eval_data.labels, fed.num_labels)


def client_scores(fed: Federation, k: int, outputs) -> dict[str, float]:
    """Client ``k``'s scores on the dev set; for classification also under its own label mix."""
    scores = task_scores(fed, outputs)
    if fed.num_labels > 1:
        scores["local_accuracy"] = label_mix_accuracy(outputs, fed.eval_data.labels, fed.histograms[k])
    return scores


def evaluate(
    fed: Federation,
    personal: Callable[[], list[dict[str, float]]] | None = None,
    workers: ClientWorkers | None = None,
) -> dict[str, float | list[int]]:
    """Personalised models (mean/min over the evaluated clients, named in
    ``evaluated_clients`` when not every client) and, where one exists, the global model.

    Every score is on the whole dev set. For classification, ``personal_local_accuracy``
    adds each client's accuracy under its own training label mix. ``personal`` gives the
    clients' scores where their tensors live elsewhere (Flower); by default they are
    computed from ``fed.clients``, in ``workers`` where there are any.
    """
    out: dict[str, float | list[int]] = {}
    global_outputs = None
    if not fed.method.has_local_state():
        global_outputs = outputs_of(fed, fed.global_tensors())
        out.update({f"global_{k}": v for k, v in task_scores(fed, global_outputs).items()})
    if fed.cfg.eval.personalised:
        ks = fed.evaluated_clients
        # Without local tensors (and with one rank) every client's model is the global one: no second pass.
        if not fed.client_models_differ():
            per_client = [client_scores(fed, k, global_outputs) for k in ks]
        elif personal is not None:
            per_client = personal()
        else:
            outputs = run_clients(fed, workers, outputs_of, ((fed.personal_tensors(k), k) for k in ks))
            per_client = [client_scores(fed, k, o) for k, o in zip(ks, outputs)]
        if per_client:
            out.update({f"personal_{k}": v for k, v in summarise(per_client).items()})
        if len(ks) < len(fed.clients):
            out["evaluated_clients"] = ks
    return out


def _mean_of(results: list[ClientResult], kind: str) -> float | None:
    values = [r.grad_norm[kind] for r in results if kind in r.grad_norm]
    return float(np.mean(values)) if values else None


@dataclass
class ClientOutcome:
    """What one client's round leaves behind: its next state, and what it sends (if anything)."""

    state: ClientState
    result: ClientResult | None  # None: the loss turned non-finite, so nothing is sent
    update: dict[str, torch.Tensor]  # what the method uploads; empty when result is None


def client_round(
    fed: Federation, k: int, state: ClientState, download: dict[str, torch.Tensor], round_: int
) -> ClientOutcome:
    """Client side of a round, for every runtime: take the download, train, pick the upload.

    ``state`` itself is left untouched. If the loss turns non-finite, the outcome's state
    is ``state`` with the download but without the training, and nothing is sent.
    """
    cfg = fed.cfg
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
    trained.tensors = pad(trained.tensors, fed.params)
    fed.ranks.use(fed.model, k)
    steps = client_steps(cfg, int(fed.client_sizes[k]))
    # The schedule spans the steps a client is expected to take: it trains in a fraction
    # n_sampled / n_clients of the rounds.
    expected_steps = math.ceil(steps * cfg.federation.rounds * fed.n_sampled / len(fed.clients))
    result = train_client(
        fed.model,
        fed.params,
        trained,
        fed.client_data[k],
        fed.tokenizer,
        fed.method.trained(round_),
        steps,
        expected_steps,
        cfg.train,
        fed.compute,
        client_dp(fed, k),
    )
    if not np.isfinite(result.loss):
        return ClientOutcome(received, None, {})
    trained.tensors = fed.ranks.view(trained.tensors, k)
    return ClientOutcome(trained, result, fed.method.upload(trained.tensors, round_))


DIVERGED = "non-finite training loss; client state restored"


@dataclass
class Inbox:
    """What reached the server in one round, in client order, before its checks."""

    clients: list[int]  # the sampled clients
    results: list[tuple[int, ClientResult]] = field(default_factory=list)  # clients that trained
    updates: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)  # replies to check
    dropped: list[int] = field(default_factory=list)  # no reply
    rejected: list[dict] = field(default_factory=list)  # refused before the checks, with a reason
    injected: list[dict] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    # SecAgg+: the server never sees an update, only the new tensors the securely summed
    # mean gives, and the clients in that mean.
    secure: tuple[dict[str, torch.Tensor], list[int]] | None = None


def expected_update(fed: Federation, round_: int) -> dict[str, torch.Tensor]:
    """The server's current value of every tensor clients upload in ``round_``."""
    return {n: fed.server[n] for n in fed.method.upload(fed.initial, round_)}


def conclude_round(fed: Federation, round_: int, inbox: Inbox, start: float) -> dict:
    """Server side of a round, for every runtime: refuse malformed, non-finite and
    (optionally) outlying replies, average the rest, and return the round's record.

    With fewer than ``server.min_replies`` sound replies the server's tensors stay as they were.
    """
    cfg = fed.cfg
    min_replies = cfg.server.min_replies
    expected = expected_update(fed, round_)
    replies, rejected = [], list(inbox.rejected)
    for k, update in inbox.updates:
        reason = check_update(update, fed.ranks.view(expected, k))
        if reason is None:
            replies.append((k, update))
        else:
            rejected.append({"client": k, "reason": reason})
    rejected.sort(key=lambda r: r["client"])  # one entry per client, in the order clients were asked
    if cfg.server.outlier_rule == "median" and replies:
        norms = [change_norm(u, fed.ranks.view(expected, k)) for k, u in replies]
        outlier = norm_outliers(norms, cfg.server.outlier_factor)
        rejected += [
            {"client": k, "reason": f"change norm {n:.3g} over {cfg.server.outlier_factor:g}x the median"}
            for (k, _), n, bad in zip(replies, norms, outlier)
            if bad
        ]
        replies = [r for r, bad in zip(replies, outlier) if not bad]
    for r in rejected:
        log.warning("round %d: update of client %d rejected: %s", round_, r["client"], r["reason"])
    if inbox.secure is not None:
        new, contributors = inbox.secure
        reason = check_update(new, expected)
        replies = [(k, None) for k in contributors] if reason is None else []
        if reason is not None:
            log.warning("round %d: the securely aggregated mean was refused: %s", round_, reason)
    update_norm = 0.0
    if expected and replies and len(replies) >= min_replies:
        if inbox.secure is None:
            new = server_aggregate(fed, [u for _, u in replies], [k for k, _ in replies], expected)
        update_norm = change_norm(new, expected)
        fed.server.update(new)
    elif expected and replies:
        log.warning(
            "round %d: %d sound replies, fewer than the %d required; skipping aggregation",
            round_,
            len(replies),
            min_replies,
        )
        replies = []
    elif expected:
        log.warning("round %d: no update accepted; the server's tensors stay as they were", round_)
    fed.round = round_
    trained = [r for _, r in inbox.results]
    privacy = {}
    if fed.privacy is not None:
        fed.dp_ledger = fed.privacy.spend(fed.dp_ledger, inbox.clients)
        privacy = fed.privacy.metrics(fed.dp_ledger)
    return {
        "round": round_,
        "clients": inbox.clients,
        "train_loss": float(
            np.average([r.loss for r in trained], weights=[fed.client_sizes[k] for k, _ in inbox.results])
        )
        if trained
        else float("nan"),
        "grad_norm_A": _mean_of(trained, "A"),
        "grad_norm_B": _mean_of(trained, "B"),
        "update_norm": update_norm,
        "gamma": fed.gamma,
        **fed.ranks.record(inbox.clients),
        "aggregated": len(replies),
        "dropped": inbox.dropped,
        "rejected": rejected,
        "injected": inbox.injected,
        "bytes_up": inbox.bytes_up,
        "bytes_down": inbox.bytes_down,
        **privacy,
        "seconds": time.perf_counter() - start,
    }


def server_aggregate(
    fed: Federation,
    updates: list[dict[str, torch.Tensor]],
    clients: list[int],
    expected: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The server's new tensors from the accepted updates: the example-weighted mean, or
    with dp=server the clipped, uniformly weighted, noised mean."""
    if fed.privacy is not None and fed.privacy.mode == "server":
        return user_level_mean(
            updates, expected, fed.privacy.clip_norm, float(fed.privacy.noise_multiplier[0]), fed.dp_rng
        )
    return fed.ranks.aggregate(updates, [float(fed.client_sizes[k]) for k in clients], clients, expected)


def sample_clients(fed: Federation) -> list[int]:
    """The clients of the next round, drawn from the federation's seeded sampler."""
    return np.sort(fed.sampler.choice(len(fed.clients), size=fed.n_sampled, replace=False)).tolist()


def run_round(fed: Federation, workers: ClientWorkers | None = None) -> dict:
    """The next communication round; returns its metrics record (without evaluation).

    Sampled clients download the global tensors, train (in ``workers`` where there are
    any) and reply; faults are injected as the config asks; :func:`conclude_round`
    checks and averages the replies.
    """
    start = time.perf_counter()
    faults = fed.cfg.faults
    round_ = fed.round + 1
    inbox = Inbox(sample_clients(fed))
    expected = expected_update(fed, round_)
    # Every fault is drawn before any client trains, so they do not depend on where clients train.
    draws = [
        (fed.fault_rng.random(), fed.fault_rng.random(), str(fed.fault_rng.choice(faults.bad_kinds)))
        for _ in inbox.clients
    ]
    training = []
    for k, (u_drop, u_bad, kind) in zip(inbox.clients, draws):
        download = fed.download(k)
        inbox.bytes_down += nbytes(download)
        if u_drop < faults.dropout:
            fed.clients[k].tensors.update({n: t.clone() for n, t in download.items()})
            inbox.dropped.append(k)
        else:
            training.append((k, download, u_bad < faults.bad_update, kind))
    # A generator: each client's old state is read only when its turn comes, and dropped once replaced.
    outcomes = run_clients(
        fed, workers, client_round, ((k, fed.clients[k], d, round_) for k, d, _, _ in training)
    )
    for (k, _, bad, kind), outcome in zip(training, outcomes):
        fed.clients[k] = outcome.state
        if outcome.result is None:
            inbox.rejected.append({"client": k, "reason": DIVERGED})
            continue
        inbox.results.append((k, outcome.result))
        update = outcome.update
        if bad:
            update = corrupt(update, fed.ranks.view(expected, k), kind, fed.fault_rng)
            inbox.injected.append({"client": k, "kind": kind})
        inbox.bytes_up += nbytes(update)
        inbox.updates.append((k, update))
    return conclude_round(fed, round_, inbox, start)


def simulate(
    fed: Federation,
    step: Callable[[Federation], dict] | None = None,
    personal: Callable[[], list[dict[str, float]]] | None = None,
) -> Iterator[dict]:
    """Run the remaining rounds, yielding each round's record (with evaluation where due).

    ``step`` plays one round and ``personal`` scores the clients' models (see
    :func:`evaluate`): by default clients train and are scored here, in forked workers
    as ``simulator.workers`` asks; Flower passes its own.
    """
    cfg = fed.cfg
    rounds, every = cfg.federation.rounds, cfg.eval.every
    n = worker_count(cfg.simulator.workers, fed.compute.device, len(fed.clients)) if step is None else 1
    workers = ClientWorkers(fed, n) if n > 1 else None
    step = step or functools.partial(run_round, workers=workers)
    try:
        while fed.round < rounds:
            record = step(fed)
            if fed.round % every == 0 or fed.round == rounds:
                start = time.perf_counter()
                record.update(evaluate(fed, personal, workers))
                record["eval_seconds"] = time.perf_counter() - start
            yield record
    finally:
        if workers is not None:
            workers.close()
