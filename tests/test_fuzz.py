"""Generated inputs to the config loader (YAML files, ``--set``) and to every data loader:
each loads, or ends in one SfedloraError (the CLI's one `error:` line), never a traceback."""

import json
import string
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfedlora.config import DataConfig, build_config, load_config
from sfedlora.data import load_task
from sfedlora.errors import SfedloraError

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every real key, so that generated trees reach the values' checks, not only "unknown key".
SECTIONS = {
    name: list(field.annotation.model_fields)
    for name, field in build_config().__class__.model_fields.items()
    if hasattr(field.annotation, "model_fields")
}
TOP = [k for k in build_config().__class__.model_fields if k not in SECTIONS]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
section_trees = st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda s: st.fixed_dictionaries({s: st.dictionaries(st.sampled_from(SECTIONS[s]), values, max_size=3)})
)
trees = st.one_of(section_trees, st.dictionaries(st.sampled_from(TOP), values, max_size=2), values)


def loads_or_refuses(load):
    """``load()`` returns, or raises SfedloraError with one line; nothing else."""
    try:
        return load()
    except SfedloraError as err:
        assert str(err) and "\n" not in str(err), repr(str(err))
        return None


@FAST
@given(tree=trees)
def test_yaml_config_files(tree):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(yaml.safe_dump(tree))
        loads_or_refuses(lambda: load_config(path))


@FAST
@given(raw=st.binary(max_size=60) | st.text(alphabet=string.printable, max_size=60))
def test_yaml_config_files_of_any_bytes(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        loads_or_refuses(lambda: load_config(path))


keys = st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks] + TOP) | st.text(max_size=10)


@FAST
@given(key=keys, value=st.text(max_size=15))
def test_set_overrides(key, value):
    loads_or_refuses(lambda: build_config(overrides=[f"{key}={value}"]))


@FAST
@given(text=st.text(max_size=25))
def test_set_overrides_of_any_text(text):
    loads_or_refuses(lambda: build_config(overrides=[text]))


cells = st.text(alphabet=string.ascii_letters + string.digits + " \t\n\"',.-é", max_size=8)


def table(header, rows, sep):
    return "\n".join(sep.join(r) for r in [header, *rows]) + "\n"


@FAST
@given(
    rows=st.lists(st.lists(cells, min_size=1, max_size=4), max_size=6),
    header=st.sampled_from([["sentence", "label"], ["index", "sentence", "label"], ["text", "y"]]),
)
def test_glue_tsv_directories(rows, header):
    with tempfile.TemporaryDirectory() as d:
        text = table(header, rows, "\t")
        (Path(d) / "train.tsv").write_text(text)
        (Path(d) / "dev.tsv").write_text(text)
        loads_or_refuses(lambda: load_task(DataConfig(source="tsv", data_dir=d)))


@FAST
@given(
    rows=st.lists(st.fixed_dictionaries({"sentence": cells, "label": values}), max_size=6),
    suffix=st.sampled_from([".csv", ".tsv", ".json", ".jsonl"]),
    num_labels=st.none() | st.integers(min_value=1, max_value=3),
)
def test_data_files(rows, suffix, num_labels):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        if suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif suffix == ".json":
            path.write_text(json.dumps(rows))
        else:
            sep = "," if suffix == ".csv" else "\t"
            path.write_text(
                table(["sentence", "label"], [[r["sentence"], str(r["label"])] for r in rows], sep)
            )
        cfg = DataConfig(
            source="files", task="mine", train_file=str(path), eval_file=str(path), num_labels=num_labels
        )
        loads_or_refuses(lambda: load_task(cfg))


lm_fields = st.dictionaries(
    st.sampled_from(["question", "answer", "instruction", "input", "output", "other"]), values, max_size=4
)


@FAST
@given(
    records=st.lists(lm_fields | values, max_size=5),
    task=st.sampled_from(["gsm8k", "alpaca"]),
    raw=st.none() | st.binary(max_size=30),
)
def test_lm_jsonl_files(records, task, raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "d.jsonl"
        if raw is None:
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            path.write_bytes(raw)
        cfg = DataConfig(source="files", task=task, train_file=str(path), eval_file=str(path))
        loads_or_refuses(lambda: load_task(cfg))
