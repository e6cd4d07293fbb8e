"""Exact resume after SIGKILL or Ctrl-C, determinism, and refusing to resume with a changed config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._pytree import tree_leaves
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.driver.experiment import run

TIMING = {"seconds", "eval_seconds"}
runner = CliRunner()


def without_timing(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def adapters(run_dir):
    return {
        p.parent.name: load_file(p)
        for p in sorted((run_dir / "adapters").glob("*/adapter_model.safetensors"))
    }


def assert_same_adapters(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for t in a[name]:
            assert a[name][t].equal(b[name][t]), (name, t)


def six_rounds(tmp_path):
    return [
        f"output_dir={tmp_path}",
        "data.max_train_examples=120",
        "data.max_eval_examples=32",
        "model.max_length=32",
        "federation.n_clients=4",
        "federation.clients_per_round=3",
        "federation.rounds=6",
        "federation.local_steps=3",
        "partition.min_size=8",
        "train.batch_size=8",
        "eval.every=2",
        "lora.rank=4",
        "lora.dropout=0.1",
        "method=sfed-lora",
        "train.schedule=cosine",
        "train.warmup_steps=2",
        # Optimizer moments and the run-long schedule are checkpointed too: resume must restore them.
        "train.optimizer_state=persistent",
    ]


def _ctrl_c_as_in_a_terminal():
    # A job started in the background (nohup, `&` in a script) inherits Ctrl-C ignored;
    # the command must behave as a user's terminal session has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "sfedlora.cli", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
        **kw,
    )


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_sigkill_after_round_3_then_resume_matches_an_uninterrupted_run(tmp_path):
    overrides = six_rounds(tmp_path)
    whole = tmp_path / "whole"
    proc = cli(*sets(overrides + ["name=whole"]))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    killed = tmp_path / "killed"
    proc = cli(*sets(overrides + ["name=killed"]))
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapters").exists()  # it really died before the end
    assert (killed / ".lock").exists()  # left behind by the dead process, taken over below

    resumed = cli("--resume", str(killed))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resumed after round" in out
    assert without_timing(killed) == without_timing(whole)
    assert [r["round"] for r in without_timing(killed)] == [1, 2, 3, 4, 5, 6]
    assert_same_adapters(adapters(killed), adapters(whole))
    assert not (killed / ".lock").exists()


def test_same_seed_same_outputs_different_seed_different(tiny_config):
    a = run(tiny_config("name=a", "lora.dropout=0.1"))
    b = run(tiny_config("name=b", "lora.dropout=0.1"))
    c = run(tiny_config("name=c", "lora.dropout=0.1", "seed=1"))
    assert without_timing(a.run_dir) == without_timing(b.run_dir)
    assert_same_adapters(adapters(a.run_dir), adapters(b.run_dir))
    assert without_timing(a.run_dir) != without_timing(c.run_dir)


def test_resume_refuses_a_config_that_changes_results(interrupted_run):
    run_dir = interrupted_run("stopped")
    # --set applies on top of the run's own config.yaml
    result = runner.invoke(app, ["run", "--resume", run_dir, *sets(["lora.rank=16", "train.lr=0.1"])])
    assert result.exit_code == 2
    assert "lora.rank, train.lr differ" in result.output
    # Keys that do not change results may differ.
    result = runner.invoke(app, ["run", "--resume", run_dir, *sets(["name=elsewhere", "checkpoint_every=3"])])
    assert result.exit_code == 0, result.output
    assert "resumed after round 1" in result.output
    result = runner.invoke(app, ["run", "--resume", run_dir])
    assert result.exit_code == 2 and "already finished" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resumed_gpu_run_keeps_client_states_in_pinned_host_memory(tiny_config):
    from sfedlora.data import load_task
    from sfedlora.driver.checkpoint import load_checkpoint
    from sfedlora.federated.federation import build_federation

    cfg = tiny_config(
        "name=gpu", "model.device=cuda", "train.optimizer=adamw", "train.optimizer_state=persistent"
    )

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    with pytest.raises(Stop):
        run(cfg, on_record=stop)
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    load_checkpoint(fed, Path(cfg.output_dir) / "gpu")
    leaves = tree_leaves([[c.tensors, c.optimizer] for c in fed.clients] + [fed.server])
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    assert any(c.optimizer for c in fed.clients)
    assert tensors and all(t.device.type == "cpu" and t.is_pinned() for t in tensors)


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "is not a run directory (no config.yaml)" in result.output


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_continue(tmp_path):
    run_dir = tmp_path / "interrupted"
    proc = cli(*sets(six_rounds(tmp_path) + ["name=interrupted"]))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert f"continue with: sfedlora run --resume {run_dir}" in err
    assert "Traceback" not in err
    # Not a terminal: a line per round even where nothing was evaluated (round 1).
    assert "round    1  loss" in out
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / ".lock").exists()

    resumed = cli("--resume", str(run_dir))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert [r["round"] for r in without_timing(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_during_an_atomic_write_lets_the_file_finish(tmp_path):
    from sfedlora.driver.rundir import atomic_write

    path = tmp_path / "state.bin"

    def write(f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
        f.write(b"complete")

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal session
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(path, write)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert path.read_bytes() == b"complete"


def test_metrics_behind_the_checkpoint_is_a_one_line_error_naming_the_fix(tmp_path):
    from sfedlora.driver.rundir import truncate_metrics
    from sfedlora.errors import SfedloraError

    lines = [json.dumps({"round": r, "train_loss": 0.5}) + "\n" for r in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    assert [r["round"] for r in truncate_metrics(tmp_path, 2)] == [1, 2]
    with pytest.raises(
        SfedloraError, match=f"holds 2 complete rounds but the checkpoint 3.*delete {tmp_path}"
    ):
        truncate_metrics(tmp_path, 3)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines)  # nothing lost
