"""The embedded runtime: one frozen base model in memory, per-client adapter state, the round loop."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .client import ClientResult, ClientState, new_client_state, steps_per_round, train_client
from .config import RunConfig
from .data import TaskData, label_histograms, partition
from .data.encoding import encode
from .evaluation import label_mix_accuracy, predict, summarise, task_metrics
from .methods import Method, aggregate, get_method, select
from .models import Compute, build_classifier, read_tensors, trainable_parameters, write_tensors
from .errors import SfedloraError
from .robust import change_norm, check_update, corrupt, norm_outliers
from .scaling import gamma

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
    client_data: list  # Encoded training data of each client
    client_sizes: np.ndarray
    histograms: np.ndarray  # label counts per client
    eval_data: object  # Encoded
    num_labels: int
    metric: str
    gamma: float
    compute: Compute
    sampler: np.random.Generator  # which clients take part in each round
    fault_rng: np.random.Generator  # injected faults (drop-outs, bad updates), apart from sampling
    round: int = 0  # rounds completed

    @property
    def n_sampled(self) -> int:
        return self.cfg.federation.sampled_per_round()

    def personal_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Client ``k``'s model: its own tensors with the server's global ones on top."""
        return {**self.clients[k].tensors, **self.server}

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.initial, **self.server}


def split_clients(cfg: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's training-example indices, as the config's partition asks."""
    p = cfg.partition
    return partition(labels, cfg.federation.n_clients, p.kind, p.beta, p.min_size, cfg.seed)


def build_federation(cfg: RunConfig, data: TaskData) -> Federation:
    method = get_method(cfg.method, local_head=cfg.federation.local_head, head_probe_rounds=cfg.federation.head_probe_rounds)
    if method.has_local_state() and not cfg.eval.personalised:
        raise SfedloraError(f"eval.personalised=false leaves nothing to evaluate: {cfg.method} has no global model "
                            "(its clients keep local tensors); set eval.personalised=true")
    if cfg.eval.judged_on == "local" and (data.num_labels == 1 or not cfg.eval.personalised):
        raise SfedloraError("eval.judged_on=local needs a classification task and eval.personalised=true "
                            "(it scores each client's personalised model under its own label mix); use judged_on=dev")
    fed = cfg.federation
    parts = split_clients(cfg, data.train.labels)
    n_sampled = fed.sampled_per_round()
    compute = Compute.resolve(cfg.model.device, cfg.model.precision)
    model, tokenizer = build_classifier(
        cfg.model.name_or_path, data.num_labels, cfg.lora.rank, cfg.lora.alpha, cfg.scaling, n_sampled,
        dropout=cfg.lora.dropout, target_modules=cfg.model.target_modules, seed=cfg.seed,
    )
    model.to(compute.device)
    params = trainable_parameters(model)
    initial = read_tensors(params)
    train_enc = encode(data.train, tokenizer, cfg.model.max_length)
    client_data = [train_enc.subset(p) for p in parts]
    return Federation(
        cfg=cfg,
        method=method,
        model=model,
        tokenizer=tokenizer,
        params=params,
        initial=initial,
        server=select(initial, method.global_kinds),
        clients=[new_client_state(initial, seed=cfg.seed * 100_003 + k + 1) for k in range(fed.n_clients)],
        client_data=client_data,
        client_sizes=np.array([len(p) for p in parts]),
        histograms=label_histograms(data.train.labels, parts, data.num_labels),
        eval_data=encode(data.eval, tokenizer, cfg.model.max_length),
        num_labels=data.num_labels,
        metric=data.metric,
        gamma=gamma(cfg.scaling, cfg.lora.alpha, cfg.lora.rank, n_sampled),
        compute=compute,
        sampler=np.random.default_rng([cfg.seed, 1]),
        fault_rng=np.random.default_rng([cfg.seed, 2]),
    )


def evaluate(fed: Federation) -> dict[str, float]:
    """Personalised models (mean/min over clients) and, where one exists, the global model.

    Every score is on the whole dev set. For classification, ``personal_local_accuracy``
    adds each client's accuracy under its own training label mix.
    """
    cfg = fed.cfg.eval
    labels = fed.eval_data.labels

    def logits_of(tensors):
        write_tensors(fed.params, tensors)
        return predict(fed.model, fed.eval_data, fed.tokenizer, cfg.batch_size, fed.compute)

    def personal_scores(k, logits):
        scores = task_metrics(logits, labels, fed.num_labels)
        if fed.num_labels > 1:
            scores["local_accuracy"] = label_mix_accuracy(logits, labels, fed.histograms[k])
        return scores

    out: dict[str, float] = {}
    global_logits = None
    if not fed.method.has_local_state():
        global_logits = logits_of(fed.global_tensors())
        out.update({f"global_{k}": v for k, v in task_metrics(global_logits, labels, fed.num_labels).items()})
    if cfg.personalised:
        # Without local tensors every client's model is the global one: no second pass.
        per_client = [
            personal_scores(k, global_logits if global_logits is not None else logits_of(fed.personal_tensors(k)))
            for k in range(len(fed.clients))
        ]
        out.update({f"personal_{k}": v for k, v in summarise(per_client).items()})
    return out


def _mean_of(results: list[ClientResult], kind: str) -> float | None:
    values = [r.grad_norm[kind] for r in results if kind in r.grad_norm]
    return float(np.mean(values)) if values else None


def _train_or_restore(fed: Federation, k: int, round_: int) -> ClientResult | None:
    """Train client ``k``; if its loss turns non-finite, put its state back and return None."""
    cfg = fed.cfg
    state = fed.clients[k]
    before = copy.deepcopy(state)
    steps = steps_per_round(int(fed.client_sizes[k]), cfg.train.batch_size,
                            cfg.federation.local_steps, cfg.federation.local_epochs)
    # The schedule spans the steps a client is expected to take: it trains in a fraction
    # n_sampled / n_clients of the rounds.
    expected_steps = math.ceil(steps * cfg.federation.rounds * fed.n_sampled / len(fed.clients))
    result = train_client(fed.model, fed.params, state, fed.client_data[k], fed.tokenizer,
                          fed.method.trained(round_), steps, expected_steps, cfg.train, fed.compute)
    if not np.isfinite(result.loss):
        fed.clients[k] = before
        return None
    return result


def run_round(fed: Federation) -> dict:
    """The next communication round; returns its metrics record (without evaluation).

    Sampled clients download the global tensors, train and reply; the server refuses
    malformed, non-finite and (optionally) outlying replies, then averages the rest.
    """
    start = time.perf_counter()
    cfg, method, faults = fed.cfg, fed.method, fed.cfg.faults
    round_ = fed.round + 1
    sampled = np.sort(fed.sampler.choice(len(fed.clients), size=fed.n_sampled, replace=False))
    expected = {n: fed.server[n] for n in method.upload(fed.initial, round_)}
    results, replies, dropped, rejected, injected = [], [], [], [], []
    bytes_up = bytes_down = 0
    for k in sampled.tolist():
        u_drop, u_bad, kind = fed.fault_rng.random(), fed.fault_rng.random(), fed.fault_rng.choice(faults.bad_kinds)
        download = method.download(fed.server)
        fed.clients[k].tensors.update({n: t.clone() for n, t in download.items()})
        bytes_down += nbytes(download)
        if u_drop < faults.dropout:
            dropped.append(k)
            continue
        result = _train_or_restore(fed, k, round_)
        if result is None:
            rejected.append({"client": k, "reason": "non-finite training loss; client state restored"})
            continue
        results.append((k, result))
        update = method.upload(fed.clients[k].tensors, round_)
        if u_bad < faults.bad_update:
            update = corrupt(update, expected, str(kind), fed.fault_rng)
            injected.append({"client": k, "kind": str(kind)})
        bytes_up += nbytes(update)
        reason = check_update(update, expected)
        if reason is None:
            replies.append((k, update))
        else:
            rejected.append({"client": k, "reason": reason})
    if cfg.server.outlier_rule == "median" and replies:
        norms = [change_norm(u, expected) for _, u in replies]
        outlier = norm_outliers(norms, cfg.server.outlier_factor)
        rejected += [{"client": k, "reason": f"change norm {n:.3g} over {cfg.server.outlier_factor:g}x the median"}
                     for (k, _), n, bad in zip(replies, norms, outlier) if bad]
        replies = [r for r, bad in zip(replies, outlier) if not bad]
    for r in rejected:
        log.warning("round %d: update of client %d rejected: %s", round_, r["client"], r["reason"])
    update_norm = 0.0
    if expected and replies:
        new = aggregate([u for _, u in replies], [float(fed.client_sizes[k]) for k, _ in replies])
        update_norm = change_norm(new, expected)
        fed.server.update(new)
    elif expected:
        log.warning("round %d: no update accepted; the server's tensors stay as they were", round_)
    fed.round = round_
    trained = [r for _, r in results]
    return {
        "round": round_,
        "clients": sampled.tolist(),
        "train_loss": float(np.average([r.loss for r in trained], weights=[fed.client_sizes[k] for k, _ in results]))
        if trained else float("nan"),
        "grad_norm_A": _mean_of(trained, "A"),
        "grad_norm_B": _mean_of(trained, "B"),
        "update_norm": update_norm,
        "gamma": fed.gamma,
        "aggregated": len(replies),
        "dropped": dropped,
        "rejected": rejected,
        "injected": injected,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "seconds": time.perf_counter() - start,
    }


def simulate(fed: Federation) -> Iterator[dict]:
    """Run the remaining rounds, yielding each round's record (with evaluation where due)."""
    rounds, every = fed.cfg.federation.rounds, fed.cfg.eval.every
    while fed.round < rounds:
        record = run_round(fed)
        if fed.round % every == 0 or fed.round == rounds:
            start = time.perf_counter()
            record.update(evaluate(fed))
            record["eval_seconds"] = time.perf_counter() - start
        yield record
