import pytest

from sfedlora.config import build_config


@pytest.fixture
def tiny_overrides(tmp_path):
    """A run of MiniLM on a handful of bundled SST-2 examples: seconds, not minutes."""
    return [
        f"output_dir={tmp_path / 'runs'}",
        "data.max_train_examples=120",
        "data.max_eval_examples=48",
        "model.max_length=32",
        "federation.n_clients=3",
        "federation.rounds=2",
        "federation.local_steps=2",
        "partition.min_size=8",
        "train.batch_size=8",
        "eval.every=1",
        "eval.batch_size=48",
        "lora.rank=4",
    ]


@pytest.fixture
def interrupted_run(tiny_config):
    """A run stopped by an exception after its first round: checkpointed, not finished."""
    from sfedlora.experiment import run

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    def make(name):
        with pytest.raises(Stop):
            run(tiny_config(f"name={name}"), on_record=stop)
        return tiny_config().output_dir + f"/{name}"

    return make


@pytest.fixture
def tiny_config(tiny_overrides):
    def make(*extra):
        return build_config(overrides=[*tiny_overrides, *extra])

    return make
