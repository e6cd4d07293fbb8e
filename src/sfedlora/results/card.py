"""The model card ``sfedlora export`` writes beside an exported model: README.md in the Hugging Face
layout (a YAML header the Hub reads, then how the model was trained, its scores and how to load
it), and the upload of the exported directory to the Hub."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..driver.rundir import read_metrics, read_summary
from ..errors import SfedloraError
from ..federated.keys import CONSTANT, Key
from ..federated.methods import get_method
from ..logs import score_text
from ..lora.models import MINILM, looks_local
from ..lora.scaling import exponents
from .finished import FinishedRun

# The Hub id of the bundled base model: what base_model names, so that the Hub links the two.
HUB_IDS = {MINILM: "sentence-transformers/all-MiniLM-L6-v2"}


def base_model_id(name_or_path: str) -> str | None:
    """The base model's Hub id, or None for a local directory (which the Hub cannot link)."""
    if name_or_path in HUB_IDS:
        return HUB_IDS[name_or_path]
    return None if looks_local(name_or_path) else name_or_path


def _score_table(scores: dict[str, float], last: dict) -> str:
    """This model's scores beside the run's last evaluation of all clients (and of the global model)."""
    metrics = [m for m in scores if m != CONSTANT]  # the collapse rule's 0/1 flag, not a score
    columns = {
        "this model": {m: scores[m] for m in metrics},
        "run: clients' mean": {m: last.get(str(Key("personal", m, "mean"))) for m in metrics},
        "run: worst client": {m: last.get(str(Key("personal", m, "mean").worst())) for m in metrics},
        "run: global model": {m: last.get(str(Key("global", m))) for m in metrics},
    }
    columns = {name: col for name, col in columns.items() if any(v is not None for v in col.values())}
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [
        f"| {m} | " + " | ".join(score_text(col[m]) for col in columns.values()) + " |" for m in metrics
    ]
    return "\n".join(lines)


def model_card(
    run: FinishedRun, client: int | None, merged: bool, scores: dict[str, float], repo: str | None = None
) -> str:
    """README.md of client ``client``'s model (None: the global one) exported from ``run``;
    ``scores`` are that model's own on the run's dev set; ``repo``, the Hub repo it goes to."""
    cfg, summary = run.cfg, read_summary(run.run_dir)
    base = base_model_id(cfg.model.name_or_path)
    n = cfg.federation.sampled_per_round()
    k = 0 if client is None else client
    rank = summary.get("client_ranks", [cfg.lora.rank] * run.n_clients)[k]
    gamma = summary.get("client_gammas", [summary["gamma"]] * run.n_clients)[k]
    a, b = exponents(cfg.scaling)
    header = {
        "library_name": "transformers" if merged else "peft",
        **({"base_model": base} if base else {}),
        "pipeline_tag": run.task.pipeline_tag,
        "tags": ["sfedlora", "federated-learning", "lora", cfg.method, *([] if merged else ["peft"])],
    }
    what = "the global model" if client is None else f"client {client}'s personalised model"
    last = _last_record(run.run_dir)
    location = base or cfg.model.name_or_path
    kwargs = "".join(f", {key}={value!r}" for key, value in run.task.auto_kwargs().items())
    where, comment = (repo, "") if repo else ("PATH", "  # this directory")
    if merged:
        load = (
            "from transformers import pipeline\n\n"
            f'model = pipeline("{run.task.pipeline_tag}", model="{where}"){comment}'
        )
    else:
        load = (
            f"from peft import PeftModel\nfrom transformers import {run.task.auto_class}\n\n"
            f'base = {run.task.auto_class}.from_pretrained("{location}"{kwargs})\n'
            f'model = PeftModel.from_pretrained(base, "{where}"){comment}'
        )
    data = cfg.data
    rows = [
        ("method", f"`{cfg.method}`: {get_method(cfg.method).description}"),
        ("scaling rule", f"`{cfg.scaling}`: γ = α·N^{a:g}/r^{b:g} = {gamma:.6g}"),
        ("N (client updates averaged per round)", f"{n} of {run.n_clients} clients"),
        ("LoRA rank r, α", f"{rank}, {cfg.lora.alpha:g}"),
        (
            "rounds",
            f"{cfg.federation.rounds} ({cfg.federation.local_steps or cfg.federation.local_epochs} "
            f"local {'steps' if cfg.federation.local_steps else 'epochs'} each)",
        ),
        ("data", f"{data.task} ({data.source}), split {cfg.partition.kind} over {run.n_clients} clients"),
        ("base model", f"`{location}`"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
{yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip()}
---

# {cfg.name}: {what}

Federated LoRA fine-tuning with sfedlora ([SFed-LoRA](https://arxiv.org/abs/2603.08058) and its
baselines), exported with `sfedlora export` from the run directory `{run.run_dir.name}`
as {"merged weights" if merged else "a PEFT adapter"}.

## Training

| setting | value |
|---|---|
{table}

## Scores on the run's dev set ({len(run.data.eval)} examples)

{_score_table(scores, last)}

("run": the run's last evaluation, round {last.get("round", "-")} of {cfg.federation.rounds}.)

## How to load

```python
{load}
```
"""


def _last_record(run_dir: Path) -> dict:
    evaluated = [r for r in read_metrics(run_dir) if any(Key.parse(k).is_score for k in r)]
    return evaluated[-1] if evaluated else {}


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload ``folder`` to the Hub model repo ``repo`` (created if missing); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as err:  # offline, refused token, unknown namespace: the export stays
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SfedloraError(
            f"could not push {folder} to the Hub repo {repo} ({reason}): the export is kept there; log in "
            f"(huggingface-cli login or HF_TOKEN), go online and run: huggingface-cli upload {repo} {folder}"
        ) from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")
