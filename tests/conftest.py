import json
from pathlib import Path

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
    from sfedlora.driver.experiment import run

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


def gsm8k_record(i: int) -> dict:
    a, b = 3 + i % 17, 5 + (7 * i) % 23
    return {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
    }


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def lm_overrides(tmp_path, cache, monkeypatch):
    """A GSM8K-format task the test writes (40 + 8 records) on the tiny LLaMA: seconds."""
    monkeypatch.setenv("SFEDLORA_CACHE", str(cache))
    train = write_jsonl(tmp_path / "train.jsonl", [gsm8k_record(i) for i in range(40)])
    test = write_jsonl(tmp_path / "test.jsonl", [gsm8k_record(100 + i) for i in range(8)])
    return [
        f"output_dir={tmp_path / 'runs'}",
        "model.name_or_path=tiny-llama",
        "model.max_length=96",
        "data.task=gsm8k",
        "data.source=files",
        f"data.train_file={train}",
        f"data.eval_file={test}",
        "federation.n_clients=2",
        "federation.rounds=2",
        "federation.local_steps=2",
        "partition.min_size=4",
        "train.batch_size=4",
        "train.lr=0.003",
        "eval.every=1",
        "eval.batch_size=8",
        "eval.max_new_tokens=8",
        "lora.rank=4",
    ]


@pytest.fixture
def server_identity(monkeypatch):
    """What Flower sets in a ServerApp process, so that tests can create messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
