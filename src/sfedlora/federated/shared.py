"""What every client and the server of one run share, and what one client brings.

:class:`Shared` is built once per process from the config: the method, the task, the one
frozen base model with its adapter, the rank plan (each client's rank and γ) and the
encoded dev set. A :class:`ClientSpec` is one client's own part: its training data, its
size and its DP settings. The embedded simulator holds one ``Shared`` and every client
(:class:`sfedlora.federated.federation.Federation`); a Flower SuperNode holds one ``Shared`` and its
own client only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import RunConfig
from ..data import TaskData, partition
from ..errors import SfedloraError
from ..lora.dual import add_personal
from ..lora.models import Compute, enable_gradient_checkpointing, read_tensors, trainable_parameters
from ..privacy import DPSGD, PrivacyPlan, plan_privacy
from ..tasks import Task, get_task
from .methods import Method, get_method
from .pruning import pruning_of
from .ranks import RankPlan


@dataclass
class Shared:
    """The run's common parts, built once: config, method, task, model, rank plan, dev set."""

    cfg: RunConfig
    method: Method
    task: Task
    model: torch.nn.Module
    tokenizer: object
    params: dict[str, torch.nn.Parameter]  # the adapter's trainable parameters, by PEFT name
    initial: dict[str, torch.Tensor]  # the adapter at initialisation, identical on every client
    ranks: RankPlan  # each client's LoRA rank and γ
    compute: Compute
    eval_data: object  # the dev set, encoded by the task

    @property
    def n_sampled(self) -> int:
        return self.cfg.federation.sampled_per_round()

    @property
    def metric(self) -> str:
        return self.task.metric


@dataclass
class ClientSpec:
    """One client's own part of the run: who it is, its training data, its DP settings."""

    k: int
    data: object  # its training examples, encoded by the task
    size: int  # its example count: its local steps and its weight in the mean
    dp: DPSGD | None  # its DP-SGD settings, or None unless privacy.dp=client


def client_parts(cfg: RunConfig, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each client's (training, own test) example indices: its share of the partition the
    config asks for, less ``eval.client_test_fraction`` of it held out (none by default)."""
    p = cfg.partition
    parts = partition(labels, cfg.federation.n_clients, p.kind, p.beta, p.min_size, cfg.seed)
    return [split_test(cfg, part, k) for k, part in enumerate(parts)]


def split_clients(cfg: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's training-example indices."""
    return [train for train, _ in client_parts(cfg, labels)]


def split_test(cfg: RunConfig, part: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``k``'s partition ``part`` as (training, own test) indices: ``eval.client_test_fraction``
    of it, at least one example where it has two, drawn from the seed (its own stream)."""
    fraction = cfg.eval.client_test_fraction
    n_test = min(len(part) - 1, max(1, round(fraction * len(part)))) if fraction and len(part) > 1 else 0
    order = np.random.default_rng([cfg.seed, 5, k]).permutation(len(part))
    return np.sort(part[order[n_test:]]), np.sort(part[order[:n_test]])


def steps_per_round(
    n_examples: int, batch_size: int, local_steps: int | None, local_epochs: float | None
) -> int:
    if local_steps is not None:
        return local_steps
    return max(1, math.ceil(local_epochs * n_examples / batch_size))


def client_steps(cfg: RunConfig, n_examples: int) -> int:
    """Local steps a client with ``n_examples`` takes in a round it is sampled in."""
    fed = cfg.federation
    return steps_per_round(n_examples, cfg.train.batch_size, fed.local_steps, fed.local_epochs)


def expected_steps(cfg: RunConfig, n_examples: int) -> int:
    """The steps a client is expected to take over the run, which its learning-rate schedule
    spans: it trains in a fraction n_sampled / n_clients of the rounds."""
    fed = cfg.federation
    return math.ceil(client_steps(cfg, n_examples) * fed.rounds * fed.sampled_per_round() / fed.n_clients)


def method_of(cfg: RunConfig) -> Method:
    """The federated method ``cfg`` names, with its head settings."""
    f = cfg.federation
    return get_method(cfg.method, local_head=f.local_head, head_probe_rounds=f.head_probe_rounds)


def client_models_differ(cfg: RunConfig) -> bool:
    """Whether the clients' models differ from each other (and from any global one): local
    tensors, or each client at its own rank."""
    return method_of(cfg).has_local_state() or cfg.lora.client_ranks is not None


def build_shared(cfg: RunConfig, data: TaskData) -> Shared:
    """The method, task and model of ``cfg``; checks first the settings they cannot run."""
    method = method_of(cfg)
    method.check(cfg)
    pruning_of(cfg)  # refuses it for a method other than HetLoRA
    if not method.has_global_model() and not cfg.eval.personalised:
        raise SfedloraError(
            f"eval.personalised=false leaves nothing to evaluate: {cfg.method} has no global model "
            "(its clients keep local tensors); set eval.personalised=true"
        )
    task = get_task(data)
    task.check(cfg)
    n_sampled = cfg.federation.sampled_per_round()
    compute = Compute.resolve(cfg.model.device, cfg.model.precision, cfg.model.attention)
    model, tokenizer = task.build_model(cfg, compute, n_sampled, data)
    if method.personal_adapter:
        add_personal(model)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(compute.device)
    params = trainable_parameters(model)
    lora = cfg.lora
    ranks = RankPlan.build(
        cfg.scaling, lora.alpha, lora.rank, lora.client_ranks, cfg.federation.n_clients, n_sampled
    )
    return Shared(
        cfg=cfg,
        method=method,
        task=task,
        model=model,
        tokenizer=tokenizer,
        params=params,
        initial=read_tensors(params),
        ranks=ranks,
        compute=compute,
        eval_data=task.encode(data.eval, tokenizer, cfg.model.max_length, "evaluation"),
    )


def privacy_plan(cfg: RunConfig, sizes: np.ndarray) -> PrivacyPlan | None:
    """The DP mechanism for clients of ``sizes`` (dp=client calibrates each to its own size).
    A method that trains in phases (FedDPA) takes a round's steps in each phase: every round is
    charged for its most phases (an upper bound on rounds with fewer, as FedDPA's first)."""
    phases = method_of(cfg).most_phases(cfg)
    return plan_privacy(cfg, sizes, np.array([phases * client_steps(cfg, int(n)) for n in sizes]))


def client_dp(cfg: RunConfig, plan: PrivacyPlan | None, index: int) -> DPSGD | None:
    """DP-SGD settings of the client at ``index`` of ``plan``, or None unless dp=client."""
    if plan is None or plan.mode != "client":
        return None
    return DPSGD(
        plan.clip_norm,
        float(plan.noise_multiplier[index]),
        float(plan.sample_rate[index]),
        cfg.privacy.secure_noise,
    )
