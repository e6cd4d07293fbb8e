"""What crosses the wire between the ServerApp and the ClientApps, and what a ClientApp
keeps in its ``Context.state`` between rounds.

Tensors travel as ``ArrayRecord`` (exact: fp32 bytes in, the same bytes out). A client's
own state (every adapter tensor, optimizer state, RNG, step count) lives only in
``Context.state``, which Flower keeps on the node: FedSA-LoRA's B and the optimizer's
moments are never put in a message.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ..config import RunConfig, build_config, dump_config
from ..federated.client import ClientResult, ClientState
from ..federated.wire import pack, unpack

CONFIG = "sfedlora"  # ConfigRecord: the run's config and key, the client asked, the round
DOWNLOAD = "download"  # ArrayRecord: the server's global tensors
UPDATE = "update"  # ArrayRecord: what the method uploads
RESULT = "result"  # MetricRecord: training statistics (or evaluation scores)
STATE_TENSORS = "sfedlora.tensors"
STATE_META = "sfedlora.federated.client"


def tensors_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({n: t.detach().cpu() for n, t in tensors.items()})


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def request(
    cfg_text: str, run: str, client: int, round_: int, download: dict[str, torch.Tensor], finish: bool = False
) -> RecordDict:
    """A server → client message body: the config (so a fresh node needs nothing else), the
    run's key (:func:`sfedlora.driver.rundir.run_key`: what the node keys its saved state by), the
    client index the server expects at that node, the round, and the download. ``finish``
    marks the query that ends the run (the node saves, and maybe sends, its adapter)."""
    meta = {"config": cfg_text, "run": run, "client": client, "round": round_, "finish": int(finish)}
    return RecordDict({CONFIG: ConfigRecord(meta), DOWNLOAD: tensors_record(download)})


class Request(NamedTuple):
    cfg: RunConfig
    text: str  # the config as sent (what the node's cache is keyed by)
    run: str
    client: int
    round: int
    download: dict[str, torch.Tensor]


def is_finish(msg: Message) -> bool:
    return bool(msg.content.config_records[CONFIG].get("finish", 0))


def config_text(cfg: RunConfig) -> str:
    return dump_config(cfg)


def read_request(msg: Message) -> Request:
    meta = msg.content.config_records[CONFIG]
    download = (
        record_tensors(msg.content.array_records[DOWNLOAD]) if DOWNLOAD in msg.content.array_records else {}
    )
    return parse_request(meta, download)


def parse_request(meta, download: dict[str, torch.Tensor]) -> Request:
    """A request from its fields (a message's config record, or a SecAgg+ FitIns config)."""
    text = str(meta["config"])
    cfg = build_config(yaml.safe_load(text))
    return Request(cfg, text, str(meta["run"]), int(meta["client"]), int(meta["round"]), download)


def train_reply(result: ClientResult | None, update: dict[str, torch.Tensor]) -> RecordDict:
    """A client's reply to a training request; ``result`` None means its loss diverged."""
    return RecordDict({UPDATE: tensors_record(update), RESULT: MetricRecord(result_stats(result))})


def result_stats(result: ClientResult | None) -> dict[str, float | int]:
    """A client's training statistics as a record's numbers; ``diverged`` when there are none."""
    return {"diverged": int(result is None), **(result.stats() if result is not None else {})}


def stats_result(stats) -> ClientResult | None:
    """The :class:`ClientResult` of :func:`result_stats`, or None where the loss diverged."""
    return None if stats["diverged"] else ClientResult.from_stats(stats)


def read_train_reply(msg: Message) -> tuple[ClientResult | None, dict[str, torch.Tensor]]:
    result = stats_result(msg.content.metric_records[RESULT])
    if result is None:
        return None, {}
    return result, record_tensors(msg.content.array_records[UPDATE])


def save_state(state: RecordDict, client: ClientState) -> None:
    """Keep ``client`` in a ClientApp's ``Context.state`` until its next round."""
    rest = client.state_dict()
    state[STATE_TENSORS] = tensors_record(rest.pop("tensors"))
    # The node's own memory, never sent: packed whole (optimizer state is nested dicts).
    state[STATE_META] = ConfigRecord({"state": pack(rest)})


def load_state(state: RecordDict) -> ClientState | None:
    """The client state kept in ``Context.state``; None before the process's first round."""
    if STATE_TENSORS not in state:
        return None
    rest = unpack(state.config_records[STATE_META]["state"])
    return ClientState.from_state_dict(
        {"tensors": record_tensors(state.array_records[STATE_TENSORS]), **rest}
    )
