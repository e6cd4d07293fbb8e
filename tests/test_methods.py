"""Aggregation rounds on hand-made tensors, and what each method trains and sends in a real run."""

import pytest
import torch

from sfedlora.data import load_task
from sfedlora.engine.simulator import run_round
from sfedlora.federated.federation import build_federation
from sfedlora.federated.methods import aggregate, get_method, tensor_kind

A, B, HEAD = (
    "m.layer.q.lora_A.default.weight",
    "m.layer.q.lora_B.default.weight",
    "m.classifier.modules_to_save.default.weight",
)
SIZES = [1, 3, 6]  # unequal client example counts


def client(a, b, h):
    return {A: torch.tensor([a, 2 * a]), B: torch.tensor([[b]]), HEAD: torch.tensor([h])}


CLIENTS = [client(1.0, 10.0, 100.0), client(2.0, 20.0, 200.0), client(4.0, 40.0, 400.0)]
# Weighted means by hand: (1*x1 + 3*x2 + 6*x3) / 10
MEAN_A = torch.tensor([(1 + 6 + 24) / 10, 2 * (1 + 6 + 24) / 10])  # [3.1, 6.2]
MEAN_B = torch.tensor([[(10 + 60 + 240) / 10]])  # [[31.]]
MEAN_HEAD = torch.tensor([(100 + 600 + 2400) / 10])  # [310.]


def server_round(method_name, round_):
    method = get_method(method_name)
    uploads = [method.upload(c, round_) for c in CLIENTS]
    return method, aggregate(uploads, SIZES)


def test_tensor_kinds_follow_peft_names():
    assert [tensor_kind(n) for n in (A, B, HEAD)] == ["A", "B", "head"]
    assert (
        tensor_kind("m.embed.lora_embedding_A.default") == "A"
        and tensor_kind("m.embed.lora_embedding_B.default") == "B"
    )


def test_fedit_averages_a_b_and_head():
    _, new = server_round("fedit", 1)
    assert set(new) == {A, B, HEAD}
    torch.testing.assert_close(new[A], MEAN_A)
    torch.testing.assert_close(new[B], MEAN_B)
    torch.testing.assert_close(new[HEAD], MEAN_HEAD)


def test_ffa_averages_b_and_head_and_never_sends_a():
    method, new = server_round("ffa-lora", 1)
    assert set(new) == {B, HEAD}
    torch.testing.assert_close(new[B], MEAN_B)
    assert "A" not in method.trained(1) | method.trained(2)


@pytest.mark.parametrize("name", ["fedsa-lora", "sfed-lora", "fedsa-rslora"])
def test_fedsa_averages_a_and_leaves_every_b_on_its_client(name):
    method, new = server_round(name, 1)
    assert set(new) == {A, HEAD}
    torch.testing.assert_close(new[A], MEAN_A)
    for k, c in enumerate(CLIENTS):
        local = {n: t.clone() for n, t in c.items()}
        local.update(method.download(new))
        assert torch.equal(local[B], CLIENTS[k][B])  # the server never touched B
        torch.testing.assert_close(local[A], MEAN_A)


def test_rolora_sends_b_in_odd_rounds_and_a_in_even_rounds():
    method, new = server_round("rolora", 1)
    assert set(new) == {B, HEAD}
    torch.testing.assert_close(new[B], MEAN_B)
    assert method.trained(1) == {"B", "head"} and method.trained(3) == {"B", "head"}
    method, new = server_round("rolora", 2)
    assert set(new) == {A, HEAD}
    torch.testing.assert_close(new[A], MEAN_A)
    assert method.trained(2) == {"A", "head"}


def test_local_head_is_trained_but_never_sent():
    method = get_method("fedit", local_head=True)
    assert "head" in method.trained(1) and set(method.upload(CLIENTS[0], 1)) == {A, B}
    assert method.has_local_state()


def test_aggregate_rejects_mismatched_updates():
    with pytest.raises(ValueError, match="zero updates"):
        aggregate([], [])
    with pytest.raises(ValueError, match="do not"):
        aggregate([{A: torch.ones(2)}, {B: torch.ones(1, 1)}], [1, 1])


# --- the same policies inside the simulator, on MiniLM ---------------------------------


def federation(tiny_config, method):
    cfg = tiny_config(f"method={method}", "train.lr=0.01")
    return build_federation(cfg, load_task(cfg.data, seed=cfg.seed))


def kind_tensors(tensors, kind):
    return {n: t for n, t in tensors.items() if tensor_kind(n) == kind}


def changed(before, after, kind):
    return any(not torch.equal(before[n], after[n]) for n in kind_tensors(before, kind))


def test_fedsa_clients_keep_distinct_b_objects_and_values(tiny_config):
    fed = federation(tiny_config, "sfed-lora")
    run_round(fed)
    b_names = list(kind_tensors(fed.initial, "B"))
    assert not any(n in fed.server for n in b_names)
    for n in b_names:
        ptrs = {c.tensors[n].data_ptr() for c in fed.clients}
        assert len(ptrs) == len(fed.clients)  # no B tensor shared between clients
    first = b_names[0]
    values = [c.tensors[first] for c in fed.clients]
    assert not torch.equal(values[0], values[1]) and not torch.equal(values[1], values[2])
    # every client's A equals the server's after the next download
    a_name = next(iter(kind_tensors(fed.initial, "A")))
    assert torch.equal(fed.personal_tensors(0)[a_name], fed.personal_tensors(2)[a_name])


def test_ffa_never_changes_a(tiny_config):
    fed = federation(tiny_config, "ffa-lora")
    for _ in range(2):
        run_round(fed)
    for c in fed.clients:
        assert not changed(fed.initial, c.tensors, "A")
        assert changed(fed.initial, c.tensors, "B")


def test_rolora_trains_and_sends_only_b_then_only_a(tiny_config):
    fed = federation(tiny_config, "rolora")
    sizes = {k: sum(t.numel() * 4 for t in kind_tensors(fed.initial, k).values()) for k in ("A", "B", "head")}
    before = {n: t.clone() for n, t in fed.server.items()}
    rec = run_round(fed)
    assert rec["grad_norm_A"] is None and rec["grad_norm_B"] > 0
    assert rec["bytes_up"] == 3 * (sizes["B"] + sizes["head"])
    assert not changed(before, fed.server, "A") and changed(before, fed.server, "B")
    before = {n: t.clone() for n, t in fed.server.items()}
    rec = run_round(fed)
    assert rec["grad_norm_B"] is None and rec["grad_norm_A"] > 0
    assert rec["bytes_up"] == 3 * (sizes["A"] + sizes["head"])
    assert changed(before, fed.server, "A") and not changed(before, fed.server, "B")


def test_head_probe_trains_only_the_head_then_freezes_it():
    method = get_method("sfed-lora", head_probe_rounds=2)
    assert method.trained(1) == method.trained(2) == {"head"}
    assert method.trained(3) == {"A", "B"}
    assert set(method.upload(CLIENTS[0], 1)) == {HEAD} and set(method.upload(CLIENTS[0], 3)) == {A}
    assert method.has_local_state()
    rolora = get_method("rolora", head_probe_rounds=1)
    assert rolora.trained(2) == {"B"} and rolora.trained(3) == {"A"} and not rolora.has_local_state()


def test_head_probe_in_a_run(tiny_config):
    cfg = tiny_config("method=fedit", "federation.head_probe_rounds=1", "train.lr=0.01")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    first = run_round(fed)
    assert first["grad_norm_A"] is None and first["grad_norm_B"] is None
    assert changed(fed.initial, fed.server, "head") and not changed(fed.initial, fed.server, "A")
    head = {n: t.clone() for n, t in kind_tensors(fed.server, "head").items()}
    second = run_round(fed)
    assert second["grad_norm_A"] > 0 and second["grad_norm_B"] > 0
    assert not changed(head, fed.server, "head")


def test_a_head_probe_over_every_round_is_the_linear_probe_baseline(tiny_config):
    cfg = tiny_config(
        "method=fedsa-lora", "federation.rounds=2", "federation.head_probe_rounds=2", "train.lr=0.01"
    )
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    for _ in range(2):
        rec = run_round(fed)
        assert rec["grad_norm_A"] is None and rec["grad_norm_B"] is None
    assert changed(fed.initial, fed.server, "head") and not changed(fed.initial, fed.server, "A")
    assert all(not changed(fed.initial, c.tensors, "B") for c in fed.clients)


def test_a_head_probe_longer_than_the_run_is_refused(tiny_config):
    with pytest.raises(Exception, match=r"head_probe_rounds \(3\) exceeds rounds \(2\)"):
        tiny_config("federation.rounds=2", "federation.head_probe_rounds=3")
