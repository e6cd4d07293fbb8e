"""A few real rounds on MiniLM: the run directory, and adapters that reload with PEFT."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from sfedlora.config import load_config
from sfedlora.data import load_task
from sfedlora.data.encoding import collate
from sfedlora.driver.experiment import run, save_adapters
from sfedlora.engine.simulator import Simulator
from sfedlora.federated.federation import build_federation
from sfedlora.federated.runtime import play
from sfedlora.lora.models import resolve_model_path, write_tensors

ROUND_KEYS = {
    "round",
    "train_loss",
    "grad_norm_A",
    "grad_norm_B",
    "update_norm",
    "gamma",
    "bytes_up",
    "bytes_down",
    "seconds",
}


def test_run_writes_the_run_directory(tiny_config):
    cfg = tiny_config("name=e2e", "method=sfed-lora")
    result = run(cfg)
    d = result.run_dir
    assert d.name == "e2e"
    resolved = yaml.safe_load((d / "config.yaml").read_text())
    assert resolved["lora"]["scaling"] == "sfed" and resolved["federation"]["rounds"] == 2
    assert load_config(d / "config.yaml") == cfg  # the resolved config re-runs as it is
    lines = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [record["round"] for record in lines] == [1, 2]
    for record in lines:
        assert ROUND_KEYS <= set(record)
        assert 0 <= record["personal_accuracy_min"] <= record["personal_accuracy_mean"] <= 1
        assert record["gamma"] == pytest.approx(16 * np.sqrt(3 / 4))
        assert (
            record["bytes_up"] > 0
            and record["bytes_down"] > 0
            and record["grad_norm_A"] > 0
            and record["grad_norm_B"] > 0
        )
    part = json.loads((d / "partition.json").read_text())
    assert sum(part["sizes"]) == 120 and np.array(part["label_histograms"]).sum() == 120
    summary = json.loads((d / "summary.json").read_text())
    assert summary["final"] == lines[-1]["personal_accuracy_mean"]
    assert sorted(p.name for p in (d / "adapters").iterdir()) == ["client_00", "client_01", "client_02"]


def test_a_client_test_run_records_the_majority_label_baseline(tiny_config):
    """Under a label skew each client's own majority label scores high with nothing learned:
    summary.json gives that score beside the client_test_* metrics."""
    from sfedlora.federated.shared import client_parts

    cfg = tiny_config("eval.client_test_fraction=0.25", "partition.kind=dirichlet", "federation.rounds=1")
    summary = json.loads((run(cfg).run_dir / "summary.json").read_text())
    labels = load_task(cfg.data, seed=cfg.seed).train.labels
    expected = np.mean(
        [
            np.mean(labels[test] == np.bincount(labels[train], minlength=2).argmax())
            for train, test in client_parts(cfg, labels)
        ]
    )
    assert summary["client_test_majority_accuracy"] == pytest.approx(expected)


def test_a_run_judged_on_local_label_mixes(tiny_config):
    cfg = tiny_config(
        "name=local",
        "partition.kind=dirichlet",
        "eval.judged_on=local",
        "save_adapters=false",
        "eval.clients=2",
    )
    result = run(cfg)
    summary = result.summary
    every = np.array(json.loads((result.run_dir / "partition.json").read_text())["label_histograms"])
    hist = every[result.records[-1]["evaluated_clients"]]
    assert summary["metric"] == summary["collapse_metric"] == "personal_local_accuracy_mean"
    # the baseline of an evaluated client that always answers its own majority label
    assert summary["trivial_score"] == pytest.approx(np.mean(hist.max(1) / hist.sum(1)))
    assert summary["final"] == result.records[-1]["personal_local_accuracy_mean"]
    # The training loss's yardstick: each client's label entropy on its own training data, size-weighted.
    p = every / every.sum(1, keepdims=True)
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    assert summary["trivial_train_loss"] == pytest.approx(np.average(entropy, weights=every.sum(1)))
    assert summary["trivial_train_predictor"] == "each client's label prior"


def test_evaluating_a_sample_of_clients_scores_those_clients_only(tiny_config):
    from sfedlora.federated.evaluation import client_scores, evaluate, outputs_of

    cfg = tiny_config(
        "federation.n_clients=5", "partition.kind=dirichlet", "method=fedsa-lora", "eval.clients=2"
    )
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    torch.manual_seed(0)
    for state in fed.clients:  # give every client its own B, so their models differ
        for name, tensor in state.tensors.items():
            if "lora_B" in name:
                tensor.normal_(std=0.5)
    chosen = fed.evaluated_clients
    assert len(chosen) == 2 and chosen == sorted(set(chosen)) and set(chosen) <= set(range(5))
    per_client = [
        client_scores(fed, fed.histograms[k], outputs_of(fed, fed.personal_tensors(k), k)) for k in range(5)
    ]
    scores = evaluate(fed)
    assert scores["evaluated_clients"] == chosen
    for key in ("accuracy", "local_accuracy"):
        assert scores[f"personal_{key}_mean"] == pytest.approx(np.mean([per_client[k][key] for k in chosen]))
        assert scores[f"personal_{key}_min"] == pytest.approx(min(per_client[k][key] for k in chosen))
    # The sample is fixed by the seed: the next evaluation scores the same clients.
    assert evaluate(fed)["evaluated_clients"] == chosen
    assert build_federation(cfg, load_task(cfg.data, seed=cfg.seed)).evaluated_clients == chosen


@pytest.mark.parametrize(
    "method, expected", [("fedit", ["global"]), ("fedsa-lora", ["client_00", "client_01", "client_02"])]
)
def test_saved_adapter_reloads_with_peft_and_gives_the_same_logits(tiny_config, tmp_path, method, expected):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config(f"method={method}", "train.lr=0.01")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    for _ in play(fed, Simulator(), tmp_path):
        pass
    paths = save_adapters(fed, tmp_path)
    assert [p.name for p in paths] == expected
    batch = collate(fed.eval_data, np.arange(16), fed.tokenizer)
    batch.pop("labels")
    tensors = fed.global_tensors() if expected == ["global"] else fed.personal_tensors(1)
    write_tensors(fed.params, tensors)
    fed.model.eval()
    with torch.no_grad():
        ours = fed.model(**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
        reloaded = PeftModel.from_pretrained(base, paths[0] if expected == ["global"] else paths[1]).eval()
        theirs = reloaded(**batch).logits
        write_tensors(fed.params, fed.initial)
        untrained = fed.model(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # Only if training moved the logits does the match say the trained adapter was saved.
    assert not torch.allclose(ours, untrained)


def test_the_cli_runs_a_job_in_a_real_process(tiny_overrides, tmp_path):
    sets = [a for o in tiny_overrides + ["name=cli", "method=fedit"] for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "-m", "sfedlora.cli", "run", *sets], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "personal_accuracy_mean" in proc.stdout
    run_dir = tmp_path / "runs" / "cli"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "adapters" / "global" / "adapter_model.safetensors").is_file()
