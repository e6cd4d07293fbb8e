"""Parallel client workers: real forked processes, and the same results as one process."""

import os
import signal

import pytest
import torch

from sfedlora.data import load_task
from sfedlora.driver.experiment import run
from sfedlora.engine.workers import ClientWorkers, worker_count
from sfedlora.errors import SfedloraError
from sfedlora.federated.federation import build_federation


def _pid(fed, k):
    return k, os.getpid(), len(fed.clients)


def test_workers_are_forked_processes_holding_the_federation(tiny_config):
    cfg = tiny_config()
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    workers = ClientWorkers(fed, 2)
    try:
        out = list(workers.map(_pid, [(k,) for k in range(5)]))
    finally:
        workers.close()
    assert [k for k, _, _ in out] == list(range(5))  # in order
    assert all(pid != os.getpid() for _, pid, _ in out)
    assert all(n == 3 for _, _, n in out)


def _die(fed):
    os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does


def test_a_worker_killed_mid_task_is_an_error_not_a_hang(tiny_config):
    cfg = tiny_config()
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    workers = ClientWorkers(fed, 2)
    try:
        with pytest.raises(SfedloraError, match="client worker process died .* --resume"):
            list(workers.map(_die, [()]))
    finally:
        workers.close()


def test_worker_count():
    threads = torch.get_num_threads()
    assert worker_count("auto", "cpu", 100) == threads
    assert worker_count("auto", "cpu", 1) == 1
    assert worker_count("auto", "cuda", 100) == 1
    assert worker_count(4, "cpu", 3) == 3
    with pytest.raises(SfedloraError, match="simulator.workers=1"):
        worker_count(2, "cuda", 10)


@pytest.mark.parametrize("method", ["sfed-lora", "fedit"])
def test_workers_give_the_same_run_as_one_process(tiny_config, method):
    # Faults too: every draw must land on the same client wherever clients train.
    common = [
        f"method={method}",
        "model.precision=fp32",
        "federation.n_clients=4",
        "federation.rounds=3",
        "faults.dropout=0.2",
        "faults.bad_update=0.3",
        "faults.bad_kinds=[scale]",
        "server.outlier_rule=median",
    ]
    one = run(tiny_config(*common, "name=one", "simulator.workers=1"))
    two = run(tiny_config(*common, "name=two", "simulator.workers=2"))
    for a, b in zip(one.records, two.records, strict=True):
        assert (
            a["dropped"] == b["dropped"] and a["injected"] == b["injected"] and a["rejected"] == b["rejected"]
        )
        # Two torch threads here, one in each worker: same math, summed in another order.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["grad_norm_B"] == pytest.approx(b["grad_norm_B"], rel=1e-4)
    # Logits equal to float rounding: at most a borderline example of the 48 may flip.
    assert one.records[-1]["personal_accuracy_mean"] == pytest.approx(
        two.records[-1]["personal_accuracy_mean"], abs=1 / 48
    )
    assert sum(len(r["injected"]) + len(r["dropped"]) for r in one.records) > 0


def test_freed_memory_is_handed_back_only_once_it_outgrows_the_live_heap(monkeypatch):
    import sfedlora.engine.workers as workers

    class Libc:
        def __init__(self, live, free):
            self.info = workers._MallInfo2(uordblks=live, fordblks=free)
            self.trims = 0

        def mallinfo2(self):
            return self.info

        def malloc_trim(self, pad):
            self.trims += 1

    for live, free, trims in [(500 << 20, 300 << 20, 0), (500 << 20, 600 << 20, 1)]:
        libc = Libc(live, free)
        monkeypatch.setattr(workers, "_LIBC", libc)
        workers.release_freed_memory()
        assert libc.trims == trims
    monkeypatch.undo()
    if workers._LIBC is not None:  # glibc's own answer reads back: this process holds live heap
        assert workers._LIBC.mallinfo2().uordblks > 0
