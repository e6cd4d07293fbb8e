"""Every method, mixed client ranks and DP-SGD end with the same adapters (and base change,
where a method owns one) on Flower's simulation engine as on the embedded simulator: one
implementation of the math. (Mixed ranks: tests/test_flower.py, which also compares every round's record.)"""

import pytest
from safetensors.torch import load_file

from sfedlora.driver.experiment import run
from sfedlora.flower.engine import run_simulation
from sfedlora.lora.base import BASE_FILE

CASES = {
    "fedit": ("method=fedit",),
    "ffa-lora": ("method=ffa-lora",),
    "fedsa-lora": ("method=fedsa-lora",),
    "rolora": ("method=rolora", "federation.rounds=3"),
    "fedsa-rslora": ("method=fedsa-rslora",),
    "sfed-lora": ("method=sfed-lora",),
    # Two of three clients a round: a node that sat out a round catches up on the base change.
    "fedex-lora": ("method=fedex-lora", "federation.clients_per_round=2", "federation.rounds=3"),
    "flora-mixed-ranks": ("method=flora", "lora.client_ranks=[2,4]"),
    "flexlora-mixed-ranks": ("method=flexlora", "lora.client_ranks=[2,4]", "lora.scaling=sfed"),
    "hetlora-mixed-ranks": ("method=hetlora", "lora.client_ranks=[2,4]"),
    # Two adapters a client: the personal one saved in client_KK/personal, compared too.
    "feddpa-mixed-ranks": ("method=feddpa", "lora.client_ranks=[2,4]"),
    # The rank-4 client's tail shrinks in round 3 under SGD (Adam's sign-like steps around
    # zero make such a small tail grow), so it prunes to rank 2 and sends less.
    "hetlora-pruning": (
        "method=hetlora",
        "lora.client_ranks=[2,4]",
        "federation.rounds=3",
        "federation.hetlora_prune_decay=0.5",
        "federation.hetlora_prune_weight=2",
        "train.optimizer=sgd",
        "train.lr=0.05",
    ),
    "dp-sgd": (
        "method=fedsa-lora",
        "privacy.dp=client",
        "privacy.noise_multiplier=0.5",
        "privacy.clip_norm=1.0",
    ),
}


def adapters(run_dir):
    """Every saved adapter (a second adapter of a client by its folder, ``client_KK/personal``),
    and the base change of a method that owns one."""
    saved = run_dir / "adapters"
    out = {
        p.parent.relative_to(saved).as_posix(): load_file(p)
        for p in sorted(saved.rglob("adapter_model.safetensors"))
    }
    return out | ({"base": load_file(saved / BASE_FILE)} if (saved / BASE_FILE).is_file() else {})


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_flower_ends_with_the_embedded_simulators_adapters(tiny_config, case):
    common = ("model.precision=fp32", "lora.dropout=0.1", "eval.every=2", "flower.collect_adapters=true")
    embedded = run(tiny_config("name=embedded", *common, *CASES[case]))
    flower = run_simulation(tiny_config("name=flower", *common, *CASES[case]))
    ours, theirs = adapters(embedded.run_dir), adapters(flower.run_dir)
    assert ours and ours.keys() == theirs.keys()
    personal = any(name.startswith("client_") for name in ours)
    assert personal or case in ("fedit", "ffa-lora", "rolora", "fedex-lora")  # no local tensors
    assert ("base" in ours) == case.startswith(("fedex", "flora"))
    assert any(name.endswith("/personal") for name in ours) == case.startswith("feddpa")
    for name in ours:
        assert ours[name].keys() == theirs[name].keys()
        for t in ours[name]:
            assert (ours[name][t] - theirs[name][t]).abs().max() <= 1e-5, (name, t)
    assert flower.records[-1]["train_loss"] == pytest.approx(embedded.records[-1]["train_loss"], abs=1e-5)
    # The simulator counts what Flower sends: the base change as each node catches up on it.
    assert [(r["bytes_up"], r["bytes_down"]) for r in flower.records] == [
        (r["bytes_up"], r["bytes_down"]) for r in embedded.records
    ]
    if case == "hetlora-pruning":  # the clients pruned: their uploads shrank
        assert embedded.records[-1]["bytes_up"] < embedded.records[0]["bytes_up"]
