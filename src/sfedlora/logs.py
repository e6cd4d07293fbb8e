"""What our commands print: library chatter turned down, and the lines a round prints."""

from __future__ import annotations

import logging
import warnings

from .federated.keys import Key


def quiet_libraries() -> None:
    """Silence per-layer load reports and progress bars of transformers and datasets.

    Called by the CLI and by every sweep worker process (spawned workers start with the
    libraries' defaults again).
    """
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # Raised by transformers when PEFT builds the model; nothing a user of ours can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes (the quantization extra, imported by PEFT) tries to fetch an optional faster
    # CPU 4-bit kernel from the Hub at import and warns when it cannot; its own kernel runs.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def score_text(value) -> str:
    """A loss or score for a round line; '-' where none was recorded (every client dropped)."""
    return "-" if value is None else f"{value:.4f}"


def round_lines(record: dict, key: str | None, every_round: bool) -> list[str]:
    """What a round prints: drop-outs, and the loss with the headline metric ``key`` where
    it was evaluated (None: every personalised mean), every round with ``every_round``
    (for logs, where no progress bar shows)."""
    lines = []
    if record["dropped"]:
        lines.append(f"round {record['round']}: no reply from clients {record['dropped']}")
    line = f"round {record['round']:>4}  loss {score_text(record['train_loss'])}"
    if key is None:
        scores = {
            k: v
            for k, v in record.items()
            if (key_ := Key.parse(k)).scope == "personal" and key_.stat == "mean" and v is not None
        }
        line += "".join(f"  {k} {score_text(v)}" for k, v in scores.items())
        evaluated = bool(scores)
    else:
        evaluated = key in record
        if evaluated:
            line += f"  {key} {score_text(record[key])}"
            # The worst client: the lowest score, or the highest where lower is better (perplexity).
            worst_key = Key.parse(key).worst()
            worst, word = str(worst_key), worst_key.stat
            if worst in record:
                line += f"  ({word} over clients {score_text(record[worst])})"
    if every_round or evaluated:
        lines.append(line)
    return lines
