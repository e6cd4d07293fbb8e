"""``sfedlora export``: a finished run's personalised (or global) model as a plain Hugging Face
model directory (merged weights, head included) or as a PEFT adapter directory, with its model card."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..data.glue import class_names
from ..errors import SfedloraError
from ..lora.base import BASE_FILE
from .card import model_card
from .finished import load_model, open_run
from .rescore import model_scores

log = logging.getLogger("sfedlora")


def export(
    run_dir: str | Path,
    out: str | Path,
    client: int | None = None,
    merge: bool = False,
    repo: str | None = None,
) -> Path:
    """Write client ``client``'s model (None: the global one) of the finished run in ``run_dir``
    to ``out``, with its tokenizer and a model card (README.md: the run's settings, the model's
    scores on the run's dev set, how to load it).

    With ``merge`` the adapter is merged into the base weights (the task head, which PEFT keeps
    in ``modules_to_save``, comes along): ``transformers.pipeline(task, model=out)`` loads it.
    Without, ``out`` is a PEFT adapter directory for the run's base model (and, where the
    method changed the base weights, their change ΔW in ``base_change.safetensors``). ``repo``:
    the Hub repo the directory will be pushed to, which the card's loading lines name.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SfedloraError(f"{out} already exists and is not an empty directory: choose another OUT")
    run = open_run(run_dir)
    model, tokenizer = load_model(run, client)
    encoded = run.task.encode(run.data.eval, tokenizer, run.cfg.model.max_length, "evaluation")
    # Written last, in place of the template PEFT writes; read first, so that a damaged
    # summary.json or metrics.jsonl stops the export before it writes anything.
    scores = model_scores(run, model, tokenizer, client, encoded, run.histograms())
    card = model_card(run, client, merge, scores, repo)
    # The length the model was trained and scored at: pipelines truncate to it with truncation=True.
    tokenizer.model_max_length = run.cfg.model.max_length
    if merge:
        model = model.merge_and_unload()
        for key, value in run.task.hf_config().items():
            setattr(model.config, key, value)
        names = class_names(run.cfg.data)
        if names and len(names) == model.config.num_labels:
            model.config.id2label = dict(enumerate(names))
            model.config.label2id = {name: i for i, name in enumerate(names)}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card, encoding="utf-8")
    changed = run.run_dir / "adapters" / BASE_FILE
    if not merge and changed.is_file():
        # The adapter was trained on a changed base: it is only right on top of W0 + ΔW.
        shutil.copyfile(changed, out / BASE_FILE)
        log.warning(
            "%s changed the base weights: the adapter needs %s added to the base model's weights "
            "(or export with --merge)",
            run.cfg.method,
            out / BASE_FILE,
        )
    return out
