"""Causal-LM task data: GSM8K and Alpaca-format instructions, prompt templates, loss-masked encoding.

An example is a prompt (the record filled into the task's template) and a target (the text
the model learns to continue it with). Only target tokens carry loss: the prompt's labels
and the padding's are -100, the index PyTorch's cross-entropy ignores.
"""

from __future__ import annotations

import codecs
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import SfedloraError
from .answers import ANSWER_MARK, final_number
from .examples import CAUSAL_LM, TaskData

log = logging.getLogger("sfedlora")

IGNORE = -100  # label of tokens that carry no loss

GSM8K_TEMPLATE = "Question: {question}\nAnswer:"
# Stanford Alpaca's two prompts (train.py of tatsu-lab/stanford_alpaca), with and without an input.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class LMTaskSpec:
    name: str
    prompt_fields: tuple[str, ...]  # record fields the template may use
    target_field: str  # record field the model learns to produce
    metric: str  # headline: accuracy (exact match of generated answers) or perplexity
    hub_name: str
    hub_config: str | None
    hub_eval_split: str | None  # None: the hub has only a train split; hold part of it out


LM_TASKS: dict[str, LMTaskSpec] = {
    "gsm8k": LMTaskSpec("gsm8k", ("question",), "answer", "accuracy", "openai/gsm8k", "main", "test"),
    "alpaca": LMTaskSpec(
        "alpaca", ("instruction", "input"), "output", "perplexity", "tatsu-lab/alpaca", None, None
    ),
}


@dataclass
class LMExamples:
    prompts: list[str]
    targets: list[str]
    references: list[str | None]  # GSM8K: the reference's final number; None where not scored by exact match

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def labels(self) -> np.ndarray:
        """LM examples have no class: one label for all keeps the partitioner's interface
        (IID and size splits use only the count)."""
        return np.zeros(len(self), dtype=np.int64)

    def subset(self, idx) -> LMExamples:
        idx = np.asarray(idx, dtype=np.int64)
        return LMExamples(
            [self.prompts[i] for i in idx], [self.targets[i] for i in idx], [self.references[i] for i in idx]
        )


def check_text(path: Path, elsewhere: str) -> None:
    """Raise a one-line SfedloraError unless ``path`` is UTF-8 text with something in it.

    Every reader of a local data file calls this first, so a binary or empty file gets the
    same message whichever reader meets it; ``elsewhere`` is the fix through the config. It
    reads in chunks: a data file handed on to ``datasets`` need not fit in memory twice.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            held = len(decoder.getstate()[0])  # the previous chunk's unfinished character
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                at = offset - held + err.start
                raise SfedloraError(
                    f"data file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                    f"{at}): save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or {elsewhere}"
                ) from None
            # A byte-order mark alone is no content (U+FEFF is not str.isspace()).
            blank = blank and all(c.isspace() or c == "\ufeff" for c in text)
            if not chunk:
                break
            offset += len(chunk)
    if blank:
        raise SfedloraError(f"data file {path} is empty: write its examples into it, or {elsewhere}")


def read_records(path: str | Path, task: str) -> list[tuple[str, dict]]:
    """(where, record) pairs of a JSONL file (one object per line) or a JSON file (an array of objects)."""
    p = Path(path)
    if not p.is_file():
        raise SfedloraError(
            f"data file {p} not found: set data.train_file / data.eval_file to your {task} JSON or JSONL "
            "files, or use data.source=hub"
        )
    check_text(p, f"point data.train_file / data.eval_file at your {task} data")
    text = p.read_text(encoding="utf-8-sig")  # a BOM is no part of the first record
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise SfedloraError(
                f"{p}:{err.lineno}: not valid JSON ({err.msg}): fix the file, or write one object per "
                "line as .jsonl"
            ) from None
        pairs = [(f"{p} item {i}", r) for i, r in enumerate(rows)]
    else:
        pairs = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                pairs.append((f"{p}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise SfedloraError(
                    f"{p}:{lineno}: not valid JSON ({err.msg}): each line of a JSONL file must be one "
                    "JSON object"
                ) from None
    for where, record in pairs:
        if not isinstance(record, dict):
            raise SfedloraError(
                f"{where}: expected a JSON object with the {task} fields, found a {type(record).__name__}"
            )
    if not pairs:
        raise SfedloraError(f"data file {p} holds no examples")
    return pairs


def _prompt(spec: LMTaskSpec, record: dict, template: str | None) -> str:
    fields = {f: str(record.get(f) or "") for f in spec.prompt_fields}
    if template is None:
        if spec.name == "gsm8k":
            template = GSM8K_TEMPLATE
        else:
            template = ALPACA_TEMPLATE if fields["input"].strip() else ALPACA_TEMPLATE_NO_INPUT
    return template.format(**fields)


def to_examples(pairs: list[tuple[str, dict]], spec: LMTaskSpec, template: str | None) -> LMExamples:
    """Prompts, targets and (GSM8K) reference numbers of the task's records."""
    prompts, targets, refs = [], [], []
    required = (spec.prompt_fields[0], spec.target_field)  # Alpaca's input may be missing or empty
    for where, record in pairs:
        missing = [f for f in required if f not in record]
        if missing:
            raise SfedloraError(
                f"{where}: no field {missing[0]!r} (fields: {', '.join(record) or 'none'}); "
                f"{spec.name} records need {', '.join(required)}"
            )
        target = str(record[spec.target_field])
        ref = None
        if spec.name == "gsm8k":
            ref = final_number(target.rpartition(ANSWER_MARK)[2]) if ANSWER_MARK in target else None
            if ref is None:
                raise SfedloraError(
                    f"{where}: answer has no final number: GSM8K answers end in '{ANSWER_MARK} <number>'"
                )
        prompts.append(_prompt(spec, record, template))
        targets.append(target)
        refs.append(ref)
    return LMExamples(prompts, targets, refs)


def check_template(template: str | None, spec: LMTaskSpec) -> None:
    if template is None:
        return
    try:
        template.format(**{f: "" for f in spec.prompt_fields})
    except (KeyError, IndexError, ValueError) as err:
        raise SfedloraError(
            f"data.prompt_template: cannot fill {template!r} ({type(err).__name__}: {err}); "
            f"{spec.name} offers {', '.join('{' + f + '}' for f in spec.prompt_fields)}"
        ) from None


def _hub_records(cfg: DataConfig, spec: LMTaskSpec) -> dict[str, list[tuple[str, dict]]]:
    import datasets

    name, config = cfg.hub_name or spec.hub_name, cfg.hub_config or spec.hub_config
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as err:
        raise SfedloraError(
            f"could not load {name} from the Hugging Face hub ({str(err).splitlines()[0]}); "
            "check the name and your connection, or use data.source=files with local JSONL files"
        ) from None
    return {split: [(f"{name} {split} row {i}", r) for i, r in enumerate(ds[split])] for split in ds}


def _hold_out(train: LMExamples, fraction: float, seed: int) -> tuple[LMExamples, LMExamples]:
    """A seeded share of the training examples set aside for evaluation (data with no test split)."""
    order = np.random.default_rng([seed, 3]).permutation(len(train))
    n_eval = max(1, round(fraction * len(train)))
    return train.subset(np.sort(order[n_eval:])), train.subset(np.sort(order[:n_eval]))


def load_lm_task(cfg: DataConfig, seed: int = 0) -> TaskData:
    """GSM8K or Alpaca-format data from local JSON/JSONL files or the hub, as a TaskData."""
    spec = LM_TASKS[cfg.task]
    check_template(cfg.prompt_template, spec)
    if cfg.source == "files":
        if cfg.train_file is None:
            raise SfedloraError(f"data.source=files needs data.train_file (a {cfg.task} JSONL file)")
        train_pairs = read_records(cfg.train_file, cfg.task)
        eval_pairs = read_records(cfg.eval_file, cfg.task) if cfg.eval_file else None
    elif cfg.source == "hub":
        splits = _hub_records(cfg, spec)
        if "train" not in splits:
            raise SfedloraError(
                f"{cfg.hub_name or spec.hub_name} has no 'train' split (it has {', '.join(splits)})"
            )
        train_pairs, eval_pairs = (
            splits["train"],
            splits.get(spec.hub_eval_split) if spec.hub_eval_split else None,
        )
    else:
        raise SfedloraError(
            f"task {cfg.task} reads data.source=files (data.train_file, data.eval_file) or data.source=hub, "
            f"not {cfg.source}"
        )
    train = to_examples(train_pairs, spec, cfg.prompt_template)
    if eval_pairs is None:
        train, evals = _hold_out(train, cfg.holdout_fraction, seed)
    else:
        evals = to_examples(eval_pairs, spec, cfg.prompt_template)
    return TaskData(cfg.task, train, evals, CAUSAL_LM, spec.metric)


@dataclass
class LMEncoded:
    """Token ids and per-token labels of each example; the prompt is the first ``prompt_lengths[i]`` ids."""

    features: list[dict[str, list[int]]]  # input_ids, labels (-100 on prompt tokens)
    prompt_lengths: list[int]
    references: list[str | None]

    def __len__(self) -> int:
        return len(self.features)

    @classmethod
    def concat(cls, parts: list[LMEncoded]) -> LMEncoded:
        """The examples of ``parts``, one after another (several clients' rows in one batch)."""
        return cls(
            *([x for p in parts for x in getattr(p, f)] for f in ("features", "prompt_lengths", "references"))
        )

    def subset(self, idx) -> LMEncoded:
        return LMEncoded(
            [self.features[i] for i in idx],
            [self.prompt_lengths[i] for i in idx],
            [self.references[i] for i in idx],
        )

    def lengths(self) -> np.ndarray:
        return np.fromiter(
            (len(f["input_ids"]) for f in self.features), dtype=np.int64, count=len(self.features)
        )

    def prompts(self) -> list[list[int]]:
        return [f["input_ids"][:n] for f, n in zip(self.features, self.prompt_lengths)]

    def collate(self, idx, tokenizer) -> dict[str, torch.Tensor]:
        """A right-padded batch: padding is masked out of attention and carries label -100."""
        rows = [self.features[i] for i in idx]
        width = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
            ),
            "labels": torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows]),
        }


def encode_lm(examples: LMExamples, tokenizer, max_length: int, split: str = "training") -> LMEncoded:
    """Prompt ids (with the tokenizer's BOS) + target ids + EOS, cut at ``max_length`` tokens.

    Prompt and target are tokenised apart so the loss mask falls exactly on the boundary.
    A longer example loses the end of its target. A prompt that alone fills ``max_length``
    keeps only its last ``max_length // 2`` tokens (where the question is asked), so that
    every example keeps answer tokens to learn from and examples stay one-to-one with the
    data the partition split. How many were cut is logged once.
    """
    prompt_ids = tokenizer(examples.prompts)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    target_ids = [ids + eos for ids in tokenizer(examples.targets, add_special_tokens=False)["input_ids"]]
    features, prompt_lengths, cut, long_prompts = [], [], 0, 0
    for p, t in zip(prompt_ids, target_ids):
        if len(p) + len(t) > max_length:
            cut += 1
            if len(p) >= max_length:
                long_prompts += 1
                p = p[-(max_length // 2) :]
            t = t[: max_length - len(p)]
        features.append({"input_ids": p + t, "labels": [IGNORE] * len(p) + t})
        prompt_lengths.append(len(p))
    if cut:
        log.warning(
            "%d of %d %s examples are longer than model.max_length=%d tokens and were truncated%s",
            cut,
            len(examples),
            split,
            max_length,
            f" ({long_prompts} prompts that alone filled it kept only their end)" if long_prompts else "",
        )
    return LMEncoded(features, prompt_lengths, list(examples.references))
