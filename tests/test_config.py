from pathlib import Path

import pytest

from sfedlora.config import build_config, dump_config, load_config, parse_override
from sfedlora.errors import SfedloraError

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def test_there_is_one_example_per_method_preset():
    from sfedlora.federated.methods import PRESETS

    assert sorted(p.stem for p in EXAMPLES) == sorted(PRESETS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_load_and_name_their_method(path):
    cfg = load_config(path)
    assert cfg.method == path.stem


def test_overrides_are_typed_by_yaml():
    assert parse_override("federation.rounds=20") == ("federation.rounds", 20)
    assert parse_override("lora.alpha=0.5") == ("lora.alpha", 0.5)
    assert parse_override("model.target_modules=[query, key]") == ("model.target_modules", ["query", "key"])
    assert parse_override("name=my run") == ("name", "my run")
    cfg = build_config(overrides=["lora.rank=64", "federation.local_head=true"])
    assert cfg.lora.rank == 64 and cfg.federation.local_head is True


def test_preset_sets_scaling_and_plain_method_defaults_to_lora():
    assert build_config().scaling == "sfed"
    assert build_config(overrides=["method=fedsa-rslora"]).scaling == "rslora"
    assert build_config(overrides=["method=fedit"]).scaling == "lora"
    assert build_config(overrides=["method=fedit", "lora.scaling=sfed"]).scaling == "sfed"


def test_n_in_the_scaling_rule_is_the_sampled_count():
    assert build_config(overrides=["federation.n_clients=20"]).federation.sampled_per_round() == 20
    assert (
        build_config(
            overrides=["federation.n_clients=20", "federation.clients_per_round=5"]
        ).federation.sampled_per_round()
        == 5
    )
    assert (
        build_config(
            overrides=["federation.n_clients=20", "federation.fraction=0.25"]
        ).federation.sampled_per_round()
        == 5
    )


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config(overrides=["method=rolora", "lora.rank=16"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["federation.local_steps=null"], "exactly one of local_steps and local_epochs"),
        (["federation.local_epochs=1"], "exactly one of local_steps and local_epochs"),
        (["federation.fraction=0.5", "federation.clients_per_round=2"], "not both"),
        (["model.device=tpu"], "model.device: String should match pattern"),
        (["lora.rank.x=1"], "lora.rank: Input should be a valid integer"),
        (["eval.clients=11"], r"eval.clients \(11\) exceeds federation.n_clients \(10\)"),
    ],
)
def test_bad_combinations_name_the_field(overrides, message):
    with pytest.raises(SfedloraError, match=message):
        build_config(overrides=overrides)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_configs_are_valid_in_every_cell(path):
    """A sweep config (with a grid: section) in every cell; a run config as it is."""
    import yaml

    from sfedlora.config import load_config
    from sfedlora.results.grid import grid_cells
    from sfedlora.results.sweep import load_sweep

    if "grid" in yaml.safe_load(path.read_text()):
        base, grid = load_sweep(path, None)
        assert len(grid_cells(grid)) >= 2
    else:
        load_config(path)
