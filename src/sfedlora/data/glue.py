"""GLUE task descriptions: columns in each distribution format, labels and metric."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # Columns in the original GLUE TSV files.
    tsv_text: str | int
    tsv_pair: str | int | None
    tsv_label: str | int
    tsv_header: bool
    dev_file: str
    # Text labels in label-id order (HF `glue` order); None for regression.
    label_names: tuple[str, ...] | None
    metric: str  # the task's headline GLUE metric besides accuracy
    # Columns of the Hugging Face `glue` dataset.
    hub_text: str
    hub_pair: str | None
    hub_eval_split: str = "validation"

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


_NLI = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        # CoLA's TSVs have no header: source, label, original label, sentence.
        TaskSpec("cola", 3, None, 1, False, "dev.tsv", ("0", "1"), "mcc", "sentence", None),
        TaskSpec(
            "sst2", "sentence", None, "label", True, "dev.tsv", ("0", "1"), "accuracy", "sentence", None
        ),
        TaskSpec(
            "mrpc",
            "#1 String",
            "#2 String",
            "Quality",
            True,
            "dev.tsv",
            ("0", "1"),
            "f1",
            "sentence1",
            "sentence2",
        ),
        TaskSpec(
            "qqp",
            "question1",
            "question2",
            "is_duplicate",
            True,
            "dev.tsv",
            ("0", "1"),
            "f1",
            "question1",
            "question2",
        ),
        TaskSpec(
            "stsb",
            "sentence1",
            "sentence2",
            "score",
            True,
            "dev.tsv",
            None,
            "pearson",
            "sentence1",
            "sentence2",
        ),
        TaskSpec(
            "mnli",
            "sentence1",
            "sentence2",
            "gold_label",
            True,
            "dev_matched.tsv",
            ("entailment", "neutral", "contradiction"),
            "accuracy",
            "premise",
            "hypothesis",
            "validation_matched",
        ),
        TaskSpec(
            "qnli", "question", "sentence", "label", True, "dev.tsv", _NLI, "accuracy", "question", "sentence"
        ),
        TaskSpec(
            "rte",
            "sentence1",
            "sentence2",
            "label",
            True,
            "dev.tsv",
            _NLI,
            "accuracy",
            "sentence1",
            "sentence2",
        ),
        TaskSpec(
            "wnli",
            "sentence1",
            "sentence2",
            "label",
            True,
            "dev.tsv",
            ("0", "1"),
            "accuracy",
            "sentence1",
            "sentence2",
        ),
    )
}

# The Hugging Face ``glue`` dataset's class names where the GLUE files label by number (the
# NLI tasks' file labels are their names already): an exported classifier's id2label, so a
# pipeline answers "positive" rather than "LABEL_1".
_NUMBERED_CLASSES = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "wnli": ("not_entailment", "entailment"),
}


def class_names(data) -> tuple[str, ...] | None:
    """The class names of a run's data (a DataConfig) in label-id order, where its labels are a
    GLUE task's own (its files or the hub's glue dataset); None for anything else: a file or
    hub dataset of your own may reuse a task's name with other classes."""
    spec = GLUE_TASKS.get(data.task)
    hub_glue = data.hub_name in (None, "nyu-mll/glue", "glue") and data.hub_config in (None, data.task)
    own = data.source in ("bundled", "tsv") or (data.source == "hub" and hub_glue)
    if spec is None or not own or spec.is_regression:
        return None
    return _NUMBERED_CLASSES.get(spec.name, spec.label_names)
