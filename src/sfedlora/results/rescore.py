"""``sfedlora evaluate``: a finished run's models scored on new labelled data.

The new data is read as the run read its evaluation data: a GLUE TSV file (or a directory
holding the task's dev file) for a GLUE run, a CSV, TSV, JSON or JSONL file with the run's
columns and label vocabulary for a run on its own files (GSM8K and Alpaca records too). The
scores are the run's own (the task's metrics; for a client also under its own label mix),
and nothing is written into the run directory.
"""

from __future__ import annotations

from pathlib import Path

from ..data import GLUE_TASKS, LM_TASKS, load_task, read_glue_tsv
from ..errors import SfedloraError
from ..federated.evaluation import summarise
from .finished import FinishedRun, client_models, open_run


def new_examples(run: FinishedRun, path: Path):
    """The labelled examples of ``path``, read as the run read its evaluation data."""
    cfg = run.cfg.data
    if not path.exists():
        raise SfedloraError(f"--data {path} not found: pass a file of labelled examples")
    spec = GLUE_TASKS.get(cfg.task)
    if spec is not None and cfg.source != "files":
        file = path / spec.dev_file if path.is_dir() else path
        if not file.is_file() or file.suffix.lower() != ".tsv":
            raise SfedloraError(
                f"--data {path}: a {cfg.task} run reads new data as a GLUE TSV file, or a directory "
                f"holding {spec.dev_file}"
            )
        return read_glue_tsv(file, spec)
    if path.is_dir():
        raise SfedloraError(f"--data {path} is a directory: pass a CSV, TSV, JSON or JSONL file")
    if cfg.source == "files":
        # The run's training file comes along: its labels give the new file's label ids.
        replaced = cfg.model_copy(update={"eval_file": str(path), "max_eval_examples": None})
    elif cfg.task in LM_TASKS:
        replaced = cfg.model_copy(
            update={
                "source": "files",
                "train_file": str(path),
                "eval_file": str(path),
                "max_eval_examples": None,
            }
        )
    else:
        raise SfedloraError(
            f"--data: the run read {cfg.task} from the hub, whose label vocabulary a new file cannot be "
            "matched with; score new data on a run made with data.source=files"
        )
    return load_task(replaced, seed=run.cfg.seed).eval


def model_scores(run: FinishedRun, model, tokenizer, k: int | None, encoded, histograms) -> dict[str, float]:
    """Client ``k``'s model (None: the global one) scored on ``encoded`` as the run scores it
    (a client also under its own label mix, from ``histograms``)."""
    outputs = run.task.outputs(model, encoded, tokenizer, run.cfg.eval, run.compute)
    if k is None:
        return run.task.scores(outputs, encoded)
    return run.task.client_scores(outputs, encoded, histograms[k])


def evaluate_run(
    run_dir: str | Path, data: str | Path, client: int | None = None
) -> dict[str, dict[str, float]]:
    """Scores of the finished run's models on the labelled examples in ``data``, by model name.

    With ``client``, that client's personalised model only. Without, the global model where the
    method has one, and every client's personalised model with their mean and min (and max,
    where lower is better) where they differ from it.
    """
    run = open_run(run_dir)
    if client is not None:
        run.check_client(client)
    examples = new_examples(run, Path(data))
    if client is not None:
        ks = [client]
    else:
        ks = [None] if run.has_global_model() else []
        ks += list(range(run.n_clients)) if run.client_models_differ() else []
    tokenizer, models = client_models(run, ks)
    encoded = run.task.encode(examples, tokenizer, run.cfg.model.max_length, "evaluation")
    histograms = run.histograms()
    scores: dict[str, dict[str, float]] = {}
    for k, model in models:
        scores["global" if k is None else f"client {k}"] = model_scores(
            run, model, tokenizer, k, encoded, histograms
        )
    clients = [s for name, s in scores.items() if name.startswith("client")]
    if len(clients) > 1:
        summary = summarise(clients)
        for stat in ("mean", "min", "max"):
            row = {m.removesuffix(f"_{stat}"): v for m, v in summary.items() if m.endswith(f"_{stat}")}
            if row:
                scores[stat] = row
    return scores
