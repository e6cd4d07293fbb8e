"""Every kind of bad input ends with one line naming the problem, exit code 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.results.grid import cell_overrides, grid_cells
from sfedlora.results.sweep import load_sweep

runner = CliRunner()

SST2_HEADER = "sentence\tlabel\n"
TROUBLESHOOTING = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"
# What a spreadsheet saved under a .csv name starts with (an .xlsx is a zip archive), and a gzipped file.
XLSX = b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xb5U"
GZIP = b"\x1f\x8b\x08\x00"


def write(path, content):
    """Text as UTF-8; bytes as they are (files that are not UTF-8 text)."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def tsv_dir(tmp_path, train, dev=SST2_HEADER + "fine\t1\n"):
    d = tmp_path / "sst2"
    d.mkdir()
    write(d / "train.tsv", train)
    if dev is not None:
        write(d / "dev.tsv", dev)
    return ["--set", "data.source=tsv", "--set", f"data.data_dir={d}"]


def source_files(train, evals, *extra):
    """``--set`` arguments for data.source=files with these training and evaluation files."""
    sets = ["data.source=files", "data.task=mine", f"data.train_file={train}", f"data.eval_file={evals}"]
    return [arg for o in sets for arg in ("--set", o)] + list(extra)


def files(tmp_path, name, text, *extra):
    f = tmp_path / name
    write(f, text)
    return source_files(f, f, *extra)


def eval_label_out_of_range(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\na,0\nb,1\n")
    (tmp_path / "dev.csv").write_text("sentence,label\nc,7\n")
    return source_files(tmp_path / "train.csv", tmp_path / "dev.csv")


def gsm8k_file(tmp_path, content):
    # The data is read before any model is built: the default MiniLM never loads.
    return [*files(tmp_path, "gsm8k.jsonl", content), "--set", "data.task=gsm8k"]


def under_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    return ["--set", f"output_dir={tmp_path}/f/runs", "--set", "name=mine"]  # a name without a timestamp


def yaml_file(tmp_path, text: str | bytes):
    f = tmp_path / "c.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return [str(f)]


CASES = {
    "unknown key": (lambda t: ["--set", "lora.rnk=4"], "unknown config key 'lora.rnk'"),
    "unknown key in file": (
        lambda t: yaml_file(t, "federation:\n  clients: 5\n"),
        "unknown config key 'federation.clients'",
    ),
    "value out of range": (
        lambda t: ["--set", "federation.rounds=0"],
        "config federation.rounds: Input should be greater than or equal to 1 (got 0)",
    ),
    "not a number": (lambda t: ["--set", "train.lr=fast"], "config train.lr: Input should be a valid number"),
    "non-finite number": (
        lambda t: ["--set", "train.lr=inf"],
        "config train.lr: must be a finite number, not inf or nan; `sfedlora config` shows its default",
    ),
    "non-finite number in file": (
        lambda t: yaml_file(t, "lora:\n  alpha: .nan\n"),
        "config lora.alpha: must be a finite number, not inf or nan",
    ),
    "negative seed": (
        lambda t: ["--set", "seed=-1"],
        "config seed: Input should be greater than or equal to 0",
    ),
    "unknown choice": (
        lambda t: ["--set", "train.optimizer=adam"],
        "config train.optimizer: Input should be 'sgd' or 'adamw'",
    ),
    "unknown method": (lambda t: ["--set", "method=fedavg"], "unknown method 'fedavg'; choose one of"),
    "preset conflict": (
        lambda t: ["--set", "lora.scaling=lora"],
        "method sfed-lora uses scaling sfed, not lora",
    ),
    "too many per round": (
        lambda t: ["--set", "federation.clients_per_round=11"],
        "clients_per_round (11) exceeds n_clients (10)",
    ),
    "override without =": (lambda t: ["--set", "rounds"], "bad override 'rounds': write it as key=value"),
    "missing config file": (lambda t: [str(t / "missing.yaml")], "missing.yaml not found"),
    "broken YAML": (lambda t: yaml_file(t, "federation:\n  rounds: [1\n"), "is not valid YAML at line"),
    "YAML not a mapping": (lambda t: yaml_file(t, "- 1\n- 2\n"), "must hold a mapping of sections"),
    "YAML not UTF-8": (  # Latin-1 "é" (0xe9) in a comment, at offset 2
        lambda t: yaml_file(t, "# \xe9t\xe9\nfederation: {rounds: 2}\n".encode("latin-1")),
        "c.yaml is not UTF-8 text (byte 0xe9 at offset 2): save it as UTF-8",
    ),
    "unknown model path": (
        lambda t: ["--set", f"model.name_or_path={t}/nomodel"],
        "nomodel has no config.json",
    ),
    "no GPU": (lambda t: ["--set", "model.device=cuda"], "model.device=cuda but PyTorch sees no CUDA GPU"),
    "data dir missing": (
        lambda t: ["--set", "data.source=tsv", "--set", f"data.data_dir={t}/none"],
        "none is not a directory",
    ),
    "dev file missing": (lambda t: tsv_dir(t, SST2_HEADER + "ok\t1\n", dev=None), "dev.tsv not found"),
    "TSV bad label": (
        lambda t: tsv_dir(t, SST2_HEADER + "ok\t1\nodd\tpositive\n"),
        "train.tsv:3: label 'positive' is not one of 0, 1",
    ),
    "TSV missing column": (lambda t: tsv_dir(t, "text\tlabel\nok\t1\n"), "has no column 'sentence'"),
    "TSV not UTF-8": (  # Latin-1 text: é is the byte 0xe9, right after "caf"
        lambda t: tsv_dir(t, SST2_HEADER.encode() + "café\t1\n".encode("latin-1")),
        "train.tsv is not UTF-8 text (byte 0xe9 at offset 18): save it as UTF-8",
    ),
    "TSV empty": (lambda t: tsv_dir(t, ""), "train.tsv is empty: write its examples into it"),
    "TSV short row": (
        lambda t: ["--set", "data.task=rte", *tsv_dir(t, "index\tsentence1\tsentence2\tlabel\n0\tonly\n")],
        "train.tsv:2: expected at least 4",
    ),
    "not a GLUE task": (lambda t: ["--set", "data.task=imdb"], "data.task 'imdb' is not a GLUE task"),
    "file format": (lambda t: files(t, "d.parquet", "x"), "d.parquet has an unknown format"),
    "file column": (
        lambda t: files(t, "d.csv", "text,label\na,0\n"),
        "training data <tmp>/d.csv has no column 'sentence'",
    ),
    "file not UTF-8 (csv)": (
        lambda t: files(t, "d.csv", XLSX),
        "d.csv is not UTF-8 text (byte 0xb5 at offset 14): save it as UTF-8",
    ),
    "file not UTF-8 (jsonl)": (
        lambda t: files(t, "d.jsonl", GZIP),
        "d.jsonl is not UTF-8 text (byte 0x8b at offset 1): save it as UTF-8",
    ),
    "file malformed (jsonl)": (
        lambda t: files(t, "d.jsonl", '{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1\n'),
        "d.jsonl:2: not valid JSON (Expecting ',' delimiter): each line of a JSONL file must be one",
    ),
    "file malformed (csv)": (
        lambda t: files(t, "d.csv", 'sentence,label\n"a,0\nb,1\n'),
        "d.csv could not be parsed as csv: Error tokenizing data. C error: EOF inside string starting at "
        "row 1: fix the file (a header row, then a row per example)",
    ),
    "file empty (csv)": (lambda t: files(t, "d.csv", ""), "d.csv is empty: write its examples into it"),
    "file empty (jsonl)": (lambda t: files(t, "d.jsonl", "\n \n"), "d.jsonl is empty: write its examples"),
    "GSM8K JSONL not UTF-8": (
        lambda t: gsm8k_file(t, b'{"question": "Caf\xe9"}\n'),
        "gsm8k.jsonl is not UTF-8 text (byte 0xe9 at offset 17): save it as UTF-8",
    ),
    "GSM8K JSONL empty": (lambda t: gsm8k_file(t, ""), "gsm8k.jsonl is empty: write its examples into it"),
    "file label column": (
        lambda t: files(t, "d.csv", "sentence,y\na,0\n"),
        "training data has no column 'label'",
    ),
    "label out of range": (
        eval_label_out_of_range,
        "evaluation data <tmp>/dev.csv: labels must lie in 0..1 (the training data's classes); found 7..7: "
        "relabel it, or set data.num_labels to the number of classes",
    ),
    "split impossible": (
        lambda t: ["--set", "partition.min_size=5000"],
        "cannot give 10 clients at least 5000 examples",
    ),
    "local judging without personal models": (
        lambda t: [
            "--set",
            "method=fedit",
            "--set",
            "eval.personalised=false",
            "--set",
            "eval.judged_on=local",
        ],
        "eval.judged_on=local needs a classification task and eval.personalised=true",
    ),
    "one-rank method with mixed ranks": (
        lambda t: ["--set", "method=fedex-lora", "--set", "lora.client_ranks=[2,4]"],
        "fedex-lora needs one rank for every client: unset lora.client_ranks",
    ),
    "run dir under a file": (under_a_file, "is a file; choose another output_dir="),
    "feddpa with a persistent optimizer": (
        lambda t: ["--set", "method=feddpa", "--set", "train.optimizer_state=persistent"],
        "feddpa trains its two adapters one after the other each round",
    ),
    "feddpa on the fused engine": (
        lambda t: [
            *("--set", "method=feddpa", "--set", "simulator.engine=fused"),
            *("--set", "data.max_train_examples=40", "--set", "federation.n_clients=2"),
        ],
        "the fused engine runs one adapter per client, feddpa two: set simulator.engine=per-client",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input(case, tmp_path):
    make_args, message = CASES[case]
    # Runs go to tmp_path/runs unless the case itself is about output_dir (the last --set wins).
    result = runner.invoke(app, ["run", "--set", f"output_dir={tmp_path}/runs", *make_args(tmp_path)])
    out = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert message.replace("<tmp>", str(tmp_path)) in out
    assert len(out.splitlines()) == 1 and out.startswith("error: ") and result.stdout == ""
    assert not (tmp_path / "runs").exists()  # nothing written
    assert_documented(out, tmp_path)


def assert_documented(message, tmp_path):
    """docs/troubleshooting.md shows the message exactly, with the test's own paths as <tmp>."""
    section = TROUBLESHOOTING.read_text().partition("## Every bad input and its message")[2]
    shown = message.replace(str(tmp_path), "<tmp>").replace("|", "\\|")
    assert f"`` {shown} ``" in section, f"docs/troubleshooting.md lacks: {shown}"


def test_a_run_directory_in_use_is_refused_and_left_alone(tmp_path, interrupted_run):
    run_dir = Path(interrupted_run("busy"))  # unfinished, as one still running would be
    assert run_dir == tmp_path / "runs" / "busy"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(str(owner.pid))
        before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
        result = runner.invoke(app, ["run", "--resume", str(run_dir)])
        assert result.exit_code == 2
        assert f"run directory {run_dir} is in use by process {owner.pid}" in result.stderr
        assert_documented(result.stderr.strip().replace(f"process {owner.pid}:", "process <pid>:"), tmp_path)
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    finally:
        owner.kill()
        owner.wait()


SWEEP = """\
lora: {rank: 8}
train: {lr: 0.01}
grid:
  method: [fedsa-rslora, sfed-lora]
  rank: [4, 8]
"""


def test_config_of_a_sweep_file_prints_its_resolved_base_and_grid_which_run_as_the_same_sweep(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    result = runner.invoke(app, ["config", str(sweep), "--set", "train.lr=0.1"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["grid"] == {"method": ["fedsa-rslora", "sfed-lora"], "rank": [4, 8]}
    assert printed["train"]["lr"] == 0.1 and printed["lora"]["rank"] == 8
    assert printed["federation"]["n_clients"] == 10  # resolved: the defaults are filled in
    # Each cell of the printed file is the cell the original runs: the base's own method
    # (sfed-lora) must not pin its scaling rule on the fedsa-rslora cells.
    again = tmp_path / "printed.yaml"
    again.write_text(result.stdout)
    base, grid = load_sweep(sweep, None, ["train.lr=0.1"])
    base_again, grid_again = load_sweep(again, None)
    assert grid_again == grid
    for cell in grid_cells(grid):
        assert build_config(base_again, cell_overrides(cell)) == build_config(base, cell_overrides(cell))
    # A cell that cannot run is named, as `sfedlora sweep` names it.
    result = runner.invoke(app, ["config", str(sweep), "--set", "lora.client_ranks=[2, 8]"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(
        "error: grid cell method-fedsa-rslora_rank-4: config lora.client_ranks: rank 8 exceeds lora.rank=4"
    )
    assert len(result.stderr.strip().splitlines()) == 1
