"""Living with a run's results: TensorBoard and W&B curves, `sfedlora export` to a model that
transformers' pipelines load, `sfedlora evaluate` on new data."""

import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.data import bundled_sst2_dir, load_task
from sfedlora.driver.experiment import run
from sfedlora.errors import SfedloraError
from sfedlora.federated.evaluation import client_scores, outputs_of
from sfedlora.results.export import export
from sfedlora.results.rescore import evaluate_run

runner = CliRunner()
HAS = {name: importlib.util.find_spec(name) is not None for name in ("tensorboard", "wandb")}
N_CLIENTS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny SFed-LoRA run that reported to every installed backend, and its federation.

    Module-scoped (the conftest's tiny_overrides is per test), so it repeats their settings, with
    a learning rate at which the clients' models differ and fp32 so scores compare exactly.
    """
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(
        overrides=[
            f"output_dir={out}",
            "name=trained",
            "method=sfed-lora",
            "data.max_train_examples=120",
            "data.max_eval_examples=48",
            "model.max_length=32",
            "model.precision=fp32",
            f"federation.n_clients={N_CLIENTS}",
            "federation.rounds=2",
            "federation.local_steps=4",
            "partition.min_size=8",
            "train.batch_size=8",
            "train.lr=0.003",
            "eval.every=1",
            "eval.batch_size=48",
            "lora.rank=4",
            f"report_to={[name for name, installed in HAS.items() if installed]}",
        ]
    )
    held = {}
    result = run(cfg, on_start=lambda fed, run_dir: held.update(fed=fed))
    return result, held["fed"]


def test_each_round_records_every_trained_clients_loss_and_gradient_norms(trained):
    result, fed = trained
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    sizes = json.loads((result.run_dir / "partition.json").read_text())["sizes"]
    for record in lines:
        stats = record["client_stats"]
        assert [s["client"] for s in stats] == record["clients"] == list(range(N_CLIENTS))
        assert all(s["grad_norm_A"] > 0 and s["grad_norm_B"] > 0 for s in stats)
        # The round's loss is the example-weighted mean of the clients' own.
        weighted = np.average([s["train_loss"] for s in stats], weights=sizes)
        assert weighted == pytest.approx(record["train_loss"], rel=1e-12)
        assert np.mean([s["grad_norm_A"] for s in stats]) == pytest.approx(record["grad_norm_A"], rel=1e-12)


@pytest.mark.skipif(
    not HAS["tensorboard"], reason="optional extra not installed: pip install -e '.[tensorboard]'"
)
def test_tensorboard_event_file_holds_server_eval_and_per_client_curves(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = trained
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def curve(tag):
        steps, values = zip(*[(e.step, e.value) for e in events.Scalars(tag)])
        assert list(steps) == [r["round"] for r in result.records], tag
        return list(values)

    records = result.records
    for key in ("train_loss", "grad_norm_A", "grad_norm_B", "gamma", "update_norm"):
        assert curve(f"server/{key}") == pytest.approx([r[key] for r in records], rel=1e-6)
    expected = [r["personal_accuracy_mean"] for r in records]
    assert curve("eval/personal_accuracy_mean") == pytest.approx(expected, rel=1e-6)
    for k in range(N_CLIENTS):
        for name in ("train_loss", "grad_norm_A", "grad_norm_B"):
            expected = [r["client_stats"][k][name] for r in records]
            assert curve(f"client/{k:02d}/{name}") == pytest.approx(expected, rel=1e-6)
    assert not any("client_stats" in t or t.endswith("/round") for t in tags)


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run: its .wandb file is a LevelDB-style log of
    protobuf records (7-byte file header; 32 KiB blocks of chunks with a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if (length, kind) == (0, 0):
            break
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                # A key with "/" is stored split into nested_key.
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
    return rows


@pytest.mark.skipif(not HAS["wandb"], reason="optional extra not installed: pip install -e '.[wandb]'")
def test_wandb_logs_offline_into_the_run_directory(trained):
    result, _ = trained
    (run_file,) = (result.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert [row["_step"] for row in rows] == [r["round"] for r in result.records]
    for row, record in zip(rows, result.records):
        assert row["server/train_loss"] == pytest.approx(record["train_loss"], rel=1e-12)
        assert row["eval/personal_accuracy_mean"] == pytest.approx(
            record["personal_accuracy_mean"], rel=1e-12
        )
        for stats in record["client_stats"]:
            assert row[f"client/{stats['client']:02d}/train_loss"] == pytest.approx(
                stats["train_loss"], rel=1e-12
            )


def test_a_missing_tracker_package_stops_the_run_naming_the_extra(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    cfg = tiny_config("name=untracked", "report_to=[wandb]")
    with pytest.raises(SfedloraError, match=r'report_to: wandb needs .*pip install "sfedlora\[wandb\]"'):
        run(cfg)
    assert not (Path(cfg.output_dir) / "untracked").exists()


def personal_accuracy(fed, k: int) -> tuple[float, np.ndarray]:
    """Client k's accuracy on the dev set as the run computes it, and its logits."""
    logits = outputs_of(fed, fed.personal_tensors(k), k)
    return client_scores(fed, fed.histograms[k], logits)["accuracy"], logits


def test_exported_client_model_scores_in_a_pipeline_as_the_run_scored_it(trained, tmp_path):
    import transformers
    from peft import PeftModel

    result, fed = trained
    accuracies = [personal_accuracy(fed, k)[0] for k in range(N_CLIENTS)]
    assert len(set(accuracies)) > 1  # personalised models that differ: client 1's is its own
    # These are the run's own numbers: their mean is what it reported for the last round.
    assert np.mean(accuracies) == pytest.approx(result.records[-1]["personal_accuracy_mean"], abs=1e-12)
    accuracy, logits = personal_accuracy(fed, 1)

    merged = runner.invoke(
        app, ["export", str(result.run_dir), "--client", "1", "--merge", str(tmp_path / "m")]
    )
    assert merged.exit_code == 0, merged.output
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "m"), device="cpu")
    dev = load_task(fed.cfg.data, seed=fed.cfg.seed).eval
    predictions = pipe(dev.texts, truncation=True, top_k=None, batch_size=16)
    # SST-2's label ids are the glue dataset's: 0 negative, 1 positive.
    probs = np.array(
        [[{p["label"]: p["score"] for p in row}[c] for c in ("negative", "positive")] for row in predictions]
    )
    assert float((probs.argmax(1) == dev.labels).mean()) == pytest.approx(accuracy, abs=1e-6)
    assert probs == pytest.approx(torch.softmax(torch.from_numpy(logits), -1).numpy(), abs=1e-5)

    # Without --merge: a PEFT adapter directory that loads on the run's base model.
    adapter = export(result.run_dir, tmp_path / "a", client=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        config["base_model_name_or_path"], num_labels=2
    )
    model = PeftModel.from_pretrained(base, adapter).eval()
    batch = pipe.tokenizer(dev.texts[:8], truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.numpy() == pytest.approx(logits[:8], abs=1e-5)


def test_export_writes_a_model_card_and_pushes_through_huggingface_hub(trained, tmp_path, monkeypatch):
    import huggingface_hub

    result, fed = trained
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(kw))
    out = tmp_path / "card"
    pushed = runner.invoke(
        app, ["export", str(result.run_dir), str(out), "--client", "1", "--push-to-hub", "me/m"]
    )
    assert pushed.exit_code == 0, pushed.output
    assert calls == [
        (("me/m",), {"repo_type": "model", "exist_ok": True}),
        {"folder_path": str(out), "repo_id": "me/m", "repo_type": "model"},
    ]
    assert "uploaded to https://huggingface.co/me/m" in pushed.output

    text = (out / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    assert yaml.safe_load(header) == {
        "library_name": "peft",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "pipeline_tag": "text-classification",
        "tags": ["sfedlora", "federated-learning", "lora", "sfed-lora", "peft"],
    }
    assert "γ = α·N^0.5/r^0.5 = 13.8564" in body  # 16·√(3/4): N = 3 clients, r = 4
    assert (
        "| N (client updates averaged per round) | 3 of 3 clients |" in body
        and "| LoRA rank r, α | 4, 16 |" in body
    )
    # The client's own dev scores, and the run's last evaluated mean.
    last = result.records[-1]
    row = f"| accuracy | {personal_accuracy(fed, 1)[0]:.4f} | {last['personal_accuracy_mean']:.4f} |"
    assert row + f" {last['personal_accuracy_min']:.4f} |" in body
    assert 'from_pretrained("sentence-transformers/all-MiniLM-L6-v2", num_labels=2)' in body
    assert 'model = PeftModel.from_pretrained(base, "me/m")' in body  # the repo it was pushed to

    monkeypatch.undo()  # the real client: the Hub is unreachable here (offline or no network)
    failed = runner.invoke(
        app, ["export", str(result.run_dir), str(tmp_path / "o"), "--client", "0", "--push-to-hub", "me/m"]
    )
    written, error = failed.output.splitlines()  # the export is kept; its upload failed
    assert failed.exit_code == 2 and error.startswith("error: could not push"), failed.output
    assert "huggingface-cli upload me/m" in failed.output and (tmp_path / "o" / "README.md").is_file()


def test_export_and_evaluate_refuse_what_they_cannot_do(trained, tmp_path):
    result, _ = trained
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((result.run_dir / "config.yaml").read_text())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = {
        ("export", str(result.run_dir), str(tmp_path / "o")): "sfed-lora has no global model",
        ("export", str(result.run_dir), "--client", "3", str(tmp_path / "o")): "--client 3 is out of range",
        ("export", str(unfinished), "--client", "0", str(tmp_path / "o")): "has not finished",
        ("export", str(result.run_dir), "--client", "0", str(tmp_path / "taken")): "already exists",
        ("evaluate", str(result.run_dir), "--data", str(tmp_path / "nope.tsv")): "not found",
        ("evaluate", str(result.run_dir), "--client", "-1", "--data", "x.tsv"): "--client -1 is out of range",
        ("evaluate", str(tmp_path), "--data", "x.tsv"): "is not a run directory",
    }
    for args, message in cases.items():
        outcome = runner.invoke(app, list(args))
        assert outcome.exit_code == 2 and message in outcome.output, (args, outcome.output)
        assert outcome.output.startswith("error: ") and outcome.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_evaluate_scores_new_data_as_the_run_scored_its_dev_set(trained, tmp_path):
    result, fed = trained
    # The run's dev set as a new user's file: the first 48 lines of the bundled GLUE dev.tsv.
    lines = (bundled_sst2_dir() / "dev.tsv").read_text().splitlines()[: 1 + 48]
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "dev.tsv").write_text("\n".join(lines) + "\n")
    before = {p: p.stat().st_mtime_ns for p in result.run_dir.rglob("*")}

    scores = evaluate_run(result.run_dir, tmp_path / "glue" / "dev.tsv")
    assert list(scores) == ["client 0", "client 1", "client 2", "mean", "min"]
    last = result.records[-1]
    for metric in ("accuracy", "local_accuracy", "mcc"):
        assert scores["mean"][metric] == pytest.approx(last[f"personal_{metric}_mean"], abs=1e-6)
        assert scores["min"][metric] == pytest.approx(last[f"personal_{metric}_min"], abs=1e-6)
    assert scores["client 1"]["accuracy"] == pytest.approx(personal_accuracy(fed, 1)[0], abs=1e-6)

    shown = runner.invoke(
        app, ["evaluate", str(result.run_dir), "--data", str(tmp_path / "glue"), "--client", "2"]
    )
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "client 2" in line)
    assert f"{scores['client 2']['accuracy']:.4f}" in row
    assert {p: p.stat().st_mtime_ns for p in result.run_dir.rglob("*")} == before  # nothing written


def test_exported_global_causal_lm_loads_in_a_text_generation_pipeline(lm_overrides, tmp_path):
    import transformers

    held = {}
    cfg = build_config(overrides=[*lm_overrides, "name=lm", "method=fedit", "model.precision=fp32"])
    result = run(cfg, on_start=lambda fed, run_dir: held.update(fed=fed))
    fed = held["fed"]
    out = export(result.run_dir, tmp_path / "lm", merge=True)  # FedIT has a global model
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    prompt = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"
    generated = pipe(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)
    assert isinstance(generated[0]["generated_text"], str)
    # The merged weights compute what the run's global model computes.
    ids = pipe.tokenizer(prompt, return_tensors="pt")
    fed.ranks.load(fed.model, fed.params, fed.global_tensors(), None)
    with torch.no_grad():
        ours, theirs = fed.model.eval()(**ids).logits, pipe.model(**ids).logits
    assert theirs.numpy() == pytest.approx(ours.numpy(), abs=1e-4)

    # evaluate reads GSM8K records as the run read its eval file, and scores what the run reported.
    scores = evaluate_run(result.run_dir, cfg.data.eval_file)
    assert list(scores) == ["global"]
    last = result.records[-1]
    assert scores["global"]["perplexity"] == pytest.approx(last["global_perplexity"], rel=1e-6)
