"""What crosses the wire between the ServerApp and the ClientApps, and what a ClientApp
keeps in its ``Context.state`` between rounds.

Tensors travel as ``ArrayRecord`` (exact: fp32 bytes in, the same bytes out). A client's
own state (every adapter tensor, optimizer state, RNG, step count) lives only in
``Context.state``, which Flower keeps on the node: FedSA-LoRA's B and the optimizer's
moments are never put in a message.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

from ..config import RunConfig, build_config, dump_config
from ..federated.catchup import CatchUp
from ..federated.client import ClientResult, ClientState
from ..federated.wire import pack, unpack

CONFIG = "sfedlora"  # ConfigRecord: the run's config and key, the client asked, the round
DOWNLOAD = "download"  # ArrayRecord: the server's global tensors
BASE = "base"  # ArrayRecord: the base change, as the node catches up on it
UPDATE = "update"  # ArrayRecord: what the method uploads
RESULT = "result"  # MetricRecord: training statistics (or evaluation scores)
STATE_TENSORS = "sfedlora.tensors"
STATE_META = "sfedlora.federated.client"
HELD_BASE = "sfedlora.base"  # the base change the node holds, and (in HELD_META) its run and round
HELD_META = "sfedlora.base.round"


def tensors_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({n: t.detach().cpu() for n, t in tensors.items()})


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def request(
    cfg_text: str,
    run: str,
    client: int,
    round_: int,
    download: dict[str, torch.Tensor],
    catch: CatchUp | None = None,
    finish: bool = False,
) -> RecordDict:
    """A server → client message body: the config (so a fresh node needs nothing else), the
    run's key (:func:`sfedlora.driver.rundir.run_key`: what the node keys its saved state by), the
    client index the server expects at that node, the round, the download and, where the
    method changes the base, the node's catch-up on it. ``finish`` marks the query that ends
    the run (the node saves, and maybe sends, its adapter)."""
    meta = {"config": cfg_text, "run": run, "client": client, "round": round_, "finish": int(finish)}
    records = {DOWNLOAD: tensors_record(download)}
    if catch is not None:
        meta.update(base_upto=catch.upto, base_since=-1 if catch.since is None else catch.since)
        records[BASE] = tensors_record(catch.flat())
    return RecordDict({CONFIG: ConfigRecord(meta), **records})


class Request(NamedTuple):
    cfg: RunConfig
    text: str  # the config as sent (what the node's cache is keyed by)
    run: str
    client: int
    round: int
    download: dict[str, torch.Tensor]
    catch: CatchUp | None = None  # the base change, for a method that changes it


def is_finish(msg: Message) -> bool:
    return bool(msg.content.config_records[CONFIG].get("finish", 0))


def config_text(cfg: RunConfig) -> str:
    return dump_config(cfg)


def read_request(msg: Message) -> Request:
    meta = msg.content.config_records[CONFIG]
    records = msg.content.array_records
    download = record_tensors(records[DOWNLOAD]) if DOWNLOAD in records else {}
    req = parse_request(meta, download)
    if BASE not in records:
        return req
    since = int(meta["base_since"])
    catch = CatchUp.from_flat(
        int(meta["base_upto"]), None if since < 0 else since, record_tensors(records[BASE])
    )
    return req._replace(catch=catch)


def parse_request(meta, download: dict[str, torch.Tensor]) -> Request:
    """A request from its fields (a message's config record, or a SecAgg+ FitIns config)."""
    text = str(meta["config"])
    cfg = build_config(yaml.safe_load(text))
    return Request(cfg, text, str(meta["run"]), int(meta["client"]), int(meta["round"]), download)


def train_reply(result: ClientResult | None, update: dict[str, torch.Tensor], req: Request) -> RecordDict:
    """A client's reply to the training request ``req``; ``result`` None means its loss
    diverged. It names the run, client and round it answers, which the server checks."""
    meta = ConfigRecord({"run": req.run, "client": req.client, "round": req.round})
    return RecordDict(
        {CONFIG: meta, UPDATE: tensors_record(update), RESULT: MetricRecord(result_stats(result))}
    )


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


def save_held_base(state: RecordDict, run: str, round_: int, change: dict[str, torch.Tensor]) -> None:
    """Keep the base change the node holds, ΔW as of round ``round_`` of run ``run``."""
    state[HELD_BASE] = tensors_record(change)
    state[HELD_META] = ConfigRecord({"run": run, "round": round_})


def load_held_base(state: RecordDict, run: str) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(round, ΔW) the node holds in run ``run``; None before it holds any."""
    if HELD_META not in state or state.config_records[HELD_META]["run"] != run:
        return None
    return int(state.config_records[HELD_META]["round"]), record_tensors(state.array_records[HELD_BASE])


class Refused(Exception):
    """A node's reply the server does not accept; the message says why (its metrics record)."""


def receive_train_reply(
    msg: Message, expected: dict | Callable[[ArrayRecord], dict], run: str, client: int, round_: int
) -> tuple[ClientResult | None, dict[str, torch.Tensor]]:
    """Client ``client``'s reply to the server's request of round ``round_`` in run ``run``,
    what :func:`read_train_reply` reads, from a node the server does not trust: it must answer
    that very request (a reply of another run, client or round is refused: a replay), hold
    training statistics of the expected kinds and, unless diverged, exactly the ``expected``
    tensors as NumPy arrays of their dtypes and shapes. Each array's header is read before its
    data, so nothing larger than expected is allocated and nothing is unpickled."""
    content = msg.content
    meta = content.config_records[CONFIG] if CONFIG in content.config_records else {}
    if meta.get("run") != run:
        raise Refused("reply of another run (its run key differs)")
    if (meta.get("client"), meta.get("round")) != (client, round_):
        raise Refused(f"reply for client {meta.get('client')} in round {meta.get('round')}, not this request")
    if RESULT not in content.metric_records:
        raise Refused("no training statistics")
    result = _checked_result(content.metric_records[RESULT])
    if result is None:
        return None, {}
    if UPDATE not in content.array_records:
        raise Refused("no update")
    return result, checked_tensors(content.array_records[UPDATE], expected)


STATS = {"diverged", "loss", "steps", "examples"}


def _checked_result(stats) -> ClientResult | None:
    extra = sorted(k for k in stats if k not in STATS and not k.startswith("grad_norm."))
    if extra or "diverged" not in stats:
        raise Refused(f"training statistics of another kind ({', '.join(extra) or 'no diverged flag'})")
    if any(isinstance(v, list) or isinstance(v, bool) for v in stats.values()):
        raise Refused("training statistics that are not numbers")
    if stats["diverged"] not in (0, 1):
        raise Refused(f"diverged flag {stats['diverged']!r}")
    if stats["diverged"]:
        return None
    if not {"loss", "steps"} <= set(stats) or not math.isfinite(stats["loss"]):
        raise Refused("no finite training loss without the diverged flag")
    if stats["steps"] < 0 or stats.get("examples", 0) < 0:
        raise Refused("negative step or example count")
    return ClientResult.from_stats(stats)


def checked_tensors(
    record: ArrayRecord, expected: dict | Callable[[ArrayRecord], dict]
) -> dict[str, torch.Tensor]:
    """``record``'s tensors, each read only if it is exactly as in ``expected``: the tensors it
    must hold, or the function of the record that gives them (a client whose rank is its own)."""
    expected = expected(record) if callable(expected) else expected
    if set(record) != set(expected):
        missing, extra = sorted(set(expected) - set(record)), sorted(set(record) - set(expected))
        raise Refused(f"wrong tensors (missing {missing[:2]}, unexpected {extra[:2]})")
    return {name: _checked_array(name, record[name], ref) for name, ref in expected.items()}


def _checked_array(name: str, array: Array, ref: torch.Tensor) -> torch.Tensor:
    want = (torch.empty(0, dtype=ref.dtype).numpy().dtype, tuple(ref.shape))
    if array.stype != SType.NUMPY:
        raise Refused(f"{name} is not a NumPy array (serialised as {array.stype!r})")
    buf = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        shape, fortran, dtype = read_header[version](buf)
    except (ValueError, KeyError, EOFError) as err:
        raise Refused(f"{name} has no readable array header ({type(err).__name__})") from None
    if (dtype, tuple(shape)) != want or fortran:
        raise Refused(f"{name} is {dtype}{tuple(shape)}, expected {want[0]}{want[1]}")
    size = math.prod(shape) * dtype.itemsize
    if len(array.data) - buf.tell() != size:
        raise Refused(f"{name} holds {len(array.data) - buf.tell()} bytes of data, not {size}")
    return torch.from_numpy(np.load(io.BytesIO(array.data), allow_pickle=False))
