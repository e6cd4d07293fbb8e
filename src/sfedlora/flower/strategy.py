"""FedSA-style partial aggregation for any Flower app: the server averages only the arrays whose
names match a pattern (LoRA A by default), and each ClientApp keeps the rest in its own
``Context.state`` across rounds.

Server side, in place of ``FedAvg`` (Flower's ``flwr.serverapp.strategy`` API, Flower 1.42)::

    strategy = PartialFedAvg(fraction_train=0.5)  # averages A; B stays on each client
    strategy.start(grid=grid, initial_arrays=ArrayRecord(get_peft_model_state_dict(model)), ...)

Client side, around the ClientApp's training::

    set_peft_model_state_dict(model, merge_local(msg.content["arrays"], context))
    ...  # local training
    arrays = keep_local(get_peft_model_state_dict(model), context)  # only the averaged arrays

Unlike ``FedAvg``, the strategy refuses a reply instead of averaging it when its averaged
arrays differ from the ones sent in names, shape or dtype, hold NaN or Inf, carry no
positive finite weight, or (the median rule) change the arrays more than ``outlier_factor``
× the median change of the round's replies; refusals are logged and kept in ``refused``.
These are the checks of :mod:`sfedlora.federated.robust`, the same as ``sfedlora run``'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..federated.methods import aggregate
from ..federated.robust import change_norm, check_update, norm_outliers

# PEFT's names for LoRA A (``get_peft_model_state_dict``: "...q_proj.lora_A.weight";
# embeddings: "...lora_embedding_A").
LORA_A = r"\.lora_(embedding_)?A(\.|$)"
LOCAL_KEY = "sfedlora.local"  # the ArrayRecord in Context.state holding a client's own arrays


def averaged_names(names: Iterable[str], pattern: str) -> list[str]:
    """The names ``pattern`` (a regular expression, searched) selects for averaging."""
    return [n for n in names if re.search(pattern, n)]


def clients_per_round(num_nodes: int, fraction_train: float, min_train_nodes: int = 2) -> int:
    """N of the sfed rule for a ``FedAvg``-sampled run: the replies a round averages, by
    ``FedAvg.configure_train``'s own sampling formula."""
    return max(int(num_nodes * fraction_train), min_train_nodes)


def _tensors(record: ArrayRecord, names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(record[n].numpy().copy()) for n in names}


class PartialFedAvg(FedAvg):
    """``FedAvg`` that averages only the arrays matching ``averaged`` (a regular expression over
    array names; PEFT's LoRA A by default), weighted by each reply's ``weighted_by_key``
    metric, and keeps every other array at the value it was sent with.

    ``checks=False`` switches off the refusals (not the weighting); ``outlier_factor=None``
    only the median rule. Other arguments are ``FedAvg``'s.
    """

    def __init__(
        self,
        averaged: str = LORA_A,
        checks: bool = True,
        outlier_factor: float | None = 10.0,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.averaged = averaged
        self.checks = checks
        self.outlier_factor = outlier_factor
        self.refused: dict[int, list[tuple[int, str]]] = {}
        self._sent: ArrayRecord | None = None

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t└──> Averaged: arrays named like %r; checks %s",
            self.averaged,
            "on" if self.checks else "off",
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not averaged_names(arrays, self.averaged):
            raise ValueError(
                f"no array name matches the averaged pattern {self.averaged!r} "
                f"(names look like {sorted(arrays)[:2]}): pass PartialFedAvg(averaged=...)"
            )
        self._sent = arrays  # the reference every reply is checked against
        return super().configure_train(server_round, arrays, config, grid)

    def _read(self, msg: Message, reference: Mapping[str, torch.Tensor]) -> tuple[dict, float, str | None]:
        """A reply's averaged tensors and weight, and why it cannot be averaged (None: it can)."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return {}, 0.0, "expected one ArrayRecord and one MetricRecord"
        weight = next(iter(content.metric_records.values())).get(self.weighted_by_key)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            return {}, 0.0, f"{self.weighted_by_key} is {weight!r}, not a positive number"
        record = next(iter(content.array_records.values()))
        try:
            update = _tensors(record, averaged_names(record, self.averaged))
        except Exception as err:  # bytes that do not decode to an array
            return {}, 0.0, f"unreadable array ({type(err).__name__})"
        return update, float(weight), check_update(update, reference) if self.checks else None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The sent arrays with the averaged ones replaced by the example-weighted mean of the
        sound replies (None: no sound reply, the arrays stay), and the replies' mean metrics."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        reference = _tensors(self._sent, averaged_names(self._sent, self.averaged))
        sound, refused = [], []
        for msg in valid:
            update, weight, reason = self._read(msg, reference)
            if reason is None:
                sound.append((msg, update, weight))
            else:
                refused.append((msg.metadata.src_node_id, reason))
        if self.checks and self.outlier_factor is not None and sound:
            norms = [change_norm(update, reference) for _, update, _ in sound]
            outlier = norm_outliers(norms, self.outlier_factor)
            refused += [
                (msg.metadata.src_node_id, f"change norm {n:.3g} over {self.outlier_factor:g}x the median")
                for (msg, _, _), n, bad in zip(sound, norms, outlier)
                if bad
            ]
            sound = [s for s, bad in zip(sound, outlier) if not bad]
        for node, reason in refused:
            log(WARNING, "round %d: reply of node %d refused: %s", server_round, node, reason)
        self.refused[server_round] = refused
        if not sound:
            return None, None
        mean = aggregate([update for _, update, _ in sound], [weight for _, _, weight in sound])
        arrays = ArrayRecord({n: Array(mean[n]) if n in mean else self._sent[n] for n in self._sent})
        metrics = self.train_metrics_aggr_fn([msg.content for msg, _, _ in sound], self.weighted_by_key)
        return arrays, metrics


def merge_local(arrays: ArrayRecord, context: Context) -> dict[str, torch.Tensor]:
    """The state dict a ClientApp loads: the server's averaged arrays, and this node's own
    value of every other one (the server's, on the node's first round; the model's own, where
    the server sends none)."""
    received = dict(arrays.to_torch_state_dict())
    own = context.state.get(LOCAL_KEY)
    if own is not None:
        received.update(own.to_torch_state_dict())
    return received


def keep_local(
    state_dict: Mapping[str, torch.Tensor], context: Context, averaged: str = LORA_A
) -> ArrayRecord:
    """Store the arrays the server does not average in ``context.state`` (they never leave the
    node) and return the ``ArrayRecord`` to send: the averaged ones."""
    names = set(averaged_names(state_dict, averaged))
    context.state[LOCAL_KEY] = ArrayRecord(
        {n: t.detach().cpu() for n, t in state_dict.items() if n not in names}
    )
    return ArrayRecord({n: t.detach().cpu() for n, t in state_dict.items() if n in names})
