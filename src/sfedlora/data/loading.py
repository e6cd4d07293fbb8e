"""Load a text-classification (or regression) task into plain lists: TSV, hub or files."""

from __future__ import annotations

import csv
import logging
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import SfedloraError
from .examples import CLASSIFICATION, REGRESSION, Examples, TaskData
from .glue import GLUE_TASKS, TaskSpec
from .lm import LM_TASKS, check_text, load_lm_task, read_records

csv.field_size_limit(sys.maxsize)


def bundled_sst2_dir() -> Path:
    """The SST-2 sample that ships with the package (GLUE TSV layout)."""
    return Path(str(resources.files("sfedlora.data") / "sample" / "sst2"))


def _parse_label(raw: str, spec: TaskSpec, where: str) -> float | int:
    raw = raw.strip()
    if spec.label_names is None:
        try:
            return float(raw)
        except ValueError:
            raise SfedloraError(
                f"{where}: label {raw!r} is not a number; task {spec.name} needs a numeric score"
            ) from None
    if raw in spec.label_names:
        return spec.label_names.index(raw)
    raise SfedloraError(
        f"{where}: label {raw!r} is not one of {', '.join(spec.label_names)} for task {spec.name}"
    )


def read_glue_tsv(path: str | Path, spec: TaskSpec) -> Examples:
    """One split of a GLUE task in the original distribution's TSV layout."""
    path = Path(path)
    if not path.is_file():
        raise SfedloraError(
            f"data file {path} not found: data.data_dir must hold the GLUE {spec.name} files (train.tsv, "
            f"{spec.dev_file})"
        )
    check_text(path, f"point data.data_dir at the GLUE {spec.name} folder")
    with path.open(newline="", encoding="utf-8-sig") as f:  # some GLUE files start with a BOM
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    columns = [spec.tsv_text, spec.tsv_pair, spec.tsv_label]
    if spec.tsv_header:
        header, body, first_line = rows[0], rows[1:], 2
        missing = [c for c in columns if c is not None and c not in header]
        if missing:
            raise SfedloraError(
                f"data file {path} has no column {missing[0]!r} (columns: {', '.join(header)}); is it a "
                f"{spec.name} file?"
            )
        idx = [None if c is None else header.index(c) for c in columns]
    else:
        body, first_line = rows, 1
        idx = columns
    width = max(i for i in idx if i is not None) + 1
    texts, pairs, labels = [], [] if spec.tsv_pair is not None else None, []
    for lineno, row in enumerate(body, start=first_line):
        if not row:
            continue
        if len(row) < width:
            raise SfedloraError(
                f"{path}:{lineno}: expected at least {width} tab-separated fields, found {len(row)}"
            )
        labels.append(_parse_label(row[idx[2]], spec, f"{path}:{lineno}"))
        texts.append(row[idx[0]].strip())
        if pairs is not None:
            pairs.append(row[idx[1]].strip())
    if not texts:
        raise SfedloraError(f"data file {path} has a header but no examples")
    dtype = np.float32 if spec.is_regression else np.int64
    return Examples(texts, pairs, np.asarray(labels, dtype=dtype))


def _load_glue_dir(task: str, data_dir: Path) -> TaskData:
    spec = GLUE_TASKS[task]
    return _task_data(
        task,
        read_glue_tsv(data_dir / "train.tsv", spec),
        read_glue_tsv(data_dir / spec.dev_file, spec),
        spec.is_regression,
        spec.num_labels,
        spec.metric,
    )


def _task_data(
    name: str, train: Examples, evals: Examples, regression: bool, n_labels: int, metric: str
) -> TaskData:
    if regression:
        return TaskData(name, train, evals, REGRESSION, metric)
    return TaskData(name, train, evals, CLASSIFICATION, metric, n_labels)


def _numeric_labels(raw, where: str, regression: bool) -> np.ndarray:
    """Labels as numbers: finite reals for regression, integers for classes."""
    kind = "finite numbers (regression: data.num_labels=1)" if regression else "integer class ids"
    bad = next(
        (
            v
            for v in raw
            if isinstance(v, bool)
            or not isinstance(v, int | float | np.number)
            or not np.isfinite(v)
            or (not regression and v != int(v))
        ),
        None,
    )
    if bad is not None or any(v is None for v in raw):
        raise SfedloraError(
            f"{where}: labels must be {kind}; found {bad!r}: fix the label column, or set data.num_labels"
        )
    return np.asarray(raw, dtype=np.float32 if regression else np.int64)


def _columns_to_examples(
    table, cfg: DataConfig, where: str, label_ids: dict | None, regression: bool, n_labels: int
) -> Examples:
    for col in (cfg.text_column, cfg.text_pair_column, cfg.label_column):
        if col is not None and col not in table.column_names:
            raise SfedloraError(
                f"{where} has no column {col!r} (columns: {', '.join(table.column_names)}): set "
                "data.text_column/text_pair_column/label_column"
            )
    raw = table[cfg.label_column]
    if label_ids is not None:
        unknown = sorted({str(v) for v in raw} - set(label_ids))
        if unknown:
            raise SfedloraError(f"{where}: label {unknown[0]!r} never occurs in the training data")
        labels = np.asarray([label_ids[str(v)] for v in raw], dtype=np.int64)
    else:
        labels = _numeric_labels(raw, where, regression)
    if (
        not regression
        and label_ids is None
        and len(labels)
        and (labels.min() < 0 or labels.max() >= n_labels)
    ):
        raise SfedloraError(
            f"{where}: labels must lie in 0..{n_labels - 1} (the training data's classes); found "
            f"{labels.min()}..{labels.max()}: relabel it, or set data.num_labels to the number of classes"
        )
    pairs = None if cfg.text_pair_column is None else [str(t) for t in table[cfg.text_pair_column]]
    return Examples([str(t) for t in table[cfg.text_column]], pairs, labels)


def _load_table(path: str):
    import datasets

    p = Path(path)
    if not p.is_file():
        raise SfedloraError(f"data file {p} not found: check data.train_file / data.eval_file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        kind, extra = "json", {}
    elif suffix in (".csv", ".tsv"):
        kind, extra = "csv", {"delimiter": "\t" if suffix == ".tsv" else ","}
    else:
        raise SfedloraError(f"data file {p} has an unknown format: use .csv, .tsv, .json or .jsonl")
    # datasets reports a binary or empty file as a generic generation error, or a traceback.
    check_text(p, "point data.train_file / data.eval_file at your data")
    # The builder also logs the parser's complaint as an error line of its own: the one line
    # raised below says it, once.
    builder_log = logging.getLogger(f"datasets.packaged_modules.{kind}.{kind}")
    level = builder_log.level
    builder_log.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train", **extra)
    except Exception as err:  # datasets raises many types for malformed files
        if suffix == ".jsonl":
            read_records(p, "classification")  # names the first line that is not one JSON object
        while err.__cause__:  # the parser's own complaint, under datasets' generic one
            err = err.__cause__
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        shape = {".jsonl": "one JSON object per line", ".json": "a JSON array of objects"}
        raise SfedloraError(
            f"data file {p} could not be parsed as {kind}: {reason}: "
            f"fix the file ({shape.get(suffix, 'a header row, then a row per example')})"
        ) from None
    finally:
        builder_log.setLevel(level)


def _label_vocabulary(values, num_labels: int | None) -> tuple[dict | None, int]:
    """Integer labels are used as they are; text labels get ids in sorted order."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        n = num_labels or int(max(values)) + 1
        if min(values) < 0 or max(values) >= n:
            raise SfedloraError(
                f"training data: labels must lie in 0..{n - 1}; found {min(values)}..{max(values)}: relabel "
                "it, or set data.num_labels to the number of classes"
            )
        return None, n
    names = sorted({str(v) for v in values})
    return {name: i for i, name in enumerate(names)}, len(names)


def _load_custom(train, evals, cfg: DataConfig, name: str) -> TaskData:
    if cfg.label_column not in train.column_names:
        raise SfedloraError(
            f"training data has no column {cfg.label_column!r} (columns: "
            f"{', '.join(train.column_names)}): set data.label_column"
        )
    values = list(train[cfg.label_column])
    regression = cfg.num_labels == 1 or (cfg.num_labels is None and values and isinstance(values[0], float))
    label_ids, n = (None, 1) if regression else _label_vocabulary(values, cfg.num_labels)
    # Name the files where there are files, so an error says which one to fix.
    files = cfg.source == "files"
    return _task_data(
        name,
        _columns_to_examples(
            train,
            cfg,
            f"training data {cfg.train_file}" if files else "training data",
            label_ids,
            regression,
            n,
        ),
        _columns_to_examples(
            evals,
            cfg,
            f"evaluation data {cfg.eval_file}" if files else "evaluation data",
            label_ids,
            regression,
            n,
        ),
        regression,
        n,
        "pearson" if regression else "accuracy",
    )


def _load_hub(cfg: DataConfig) -> TaskData:
    import datasets

    spec = GLUE_TASKS.get(cfg.task)
    name = cfg.hub_name or ("nyu-mll/glue" if spec else None)
    if name is None:
        raise SfedloraError(f"data.hub_name is required for task {cfg.task!r} from the hub")
    config = cfg.hub_config or (cfg.task if spec else None)
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as err:
        raise SfedloraError(
            f"could not load {name}/{config} from the Hugging Face hub ({str(err).splitlines()[0]}); "
            "check the name and your connection, or use data.source=tsv with local files"
        ) from None
    eval_split = spec.hub_eval_split if spec else "validation"
    for split in ("train", eval_split):
        if split not in ds:
            raise SfedloraError(
                f"{name}/{config} has no {split!r} split (it has {', '.join(ds)}); sfedlora trains on "
                "'train' "
                "and evaluates on 'validation'"
            )
    if spec is None:
        return _load_custom(ds["train"], ds["validation"], cfg, cfg.task)
    columns = DataConfig(text_column=spec.hub_text, text_pair_column=spec.hub_pair, label_column="label")
    regression = spec.is_regression
    return _task_data(
        cfg.task,
        _columns_to_examples(
            ds["train"], columns, f"{name}/{config} train", None, regression, spec.num_labels
        ),
        _columns_to_examples(
            ds[eval_split], columns, f"{name}/{config} {eval_split}", None, regression, spec.num_labels
        ),
        regression,
        spec.num_labels,
        spec.metric,
    )


def _subsample(ex: Examples, n: int | None, seed: int) -> Examples:
    if n is None or n >= len(ex):
        return ex
    return ex.subset(np.sort(np.random.default_rng(seed).choice(len(ex), size=n, replace=False)))


def load_task(cfg: DataConfig, seed: int = 0) -> TaskData:
    """Load the train and evaluation splits that ``cfg`` names."""
    if cfg.source in ("bundled", "tsv") and cfg.task not in GLUE_TASKS:
        raise SfedloraError(
            f"data.task {cfg.task!r} is not a GLUE task ({', '.join(GLUE_TASKS)}); use data.source=files "
            "for your own data"
        )
    if cfg.task in LM_TASKS:
        data = load_lm_task(cfg, seed)
    elif cfg.source == "bundled":
        if cfg.task != "sst2":
            raise SfedloraError(
                f"only SST-2 is bundled; for {cfg.task} set data.source=tsv with data.data_dir, or "
                "data.source=hub"
            )
        data = _load_glue_dir("sst2", bundled_sst2_dir())
    elif cfg.source == "tsv":
        if cfg.data_dir is None:
            raise SfedloraError(
                "data.source=tsv needs data.data_dir: a directory with the GLUE train.tsv and dev.tsv"
            )
        if not Path(cfg.data_dir).is_dir():
            raise SfedloraError(
                f"data.data_dir {cfg.data_dir} is not a directory: point it at the folder of the GLUE "
                f"{cfg.task} train.tsv and {GLUE_TASKS[cfg.task].dev_file}"
            )
        data = _load_glue_dir(cfg.task, Path(cfg.data_dir))
    elif cfg.source == "hub":
        data = _load_hub(cfg)
    else:
        if cfg.train_file is None or cfg.eval_file is None:
            raise SfedloraError("data.source=files needs data.train_file and data.eval_file")
        data = _load_custom(_load_table(cfg.train_file), _load_table(cfg.eval_file), cfg, cfg.task)
    data.train = _subsample(data.train, cfg.max_train_examples, seed)
    if cfg.max_eval_examples is not None:
        data.eval = data.eval.subset(np.arange(min(cfg.max_eval_examples, len(data.eval))))
    return data
