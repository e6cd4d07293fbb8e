"""What our commands print: library chatter turned down, and the lines a round prints."""

from __future__ import annotations

import logging
import warnings

from .federated.keys import Key


class quiet_libraries:  # lower case: called like the function it was, and used with `with`
    """Silence per-layer load reports and progress bars of transformers and datasets.

    Called, it silences them for the rest of the process: the CLI and every sweep worker or
    Flower process (spawned processes start with the libraries' defaults again). Used as
    ``with quiet_libraries():`` (as :func:`sfedlora.run` does), it puts back on exit every
    setting it changed, so that a library call leaves its caller's logging as it found it.
    """

    # bitsandbytes (the quantization extra, imported by PEFT) tries to fetch an optional faster
    # CPU 4-bit kernel from the Hub at import through the `kernels` package and warns when it
    # cannot (and, offline, that it skips the publisher check); its own kernel runs.
    _LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")

    def __init__(self) -> None:
        import datasets
        import transformers

        hf = transformers.utils.logging
        self._saved = (
            hf.get_verbosity(),
            hf.is_progress_bar_enabled(),
            datasets.is_progress_bar_enabled(),
            [logging.getLogger(name).level for name in self._LOGGERS],
        )
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        hf.set_verbosity_error()
        hf.disable_progress_bar()
        datasets.disable_progress_bars()
        # Raised by transformers when PEFT builds the model; nothing a user of ours can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        for name in self._LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __enter__(self) -> quiet_libraries:
        return self

    def __exit__(self, *exc) -> None:
        import datasets
        import transformers

        hf = transformers.utils.logging
        verbosity, bars, dataset_bars, levels = self._saved
        hf.set_verbosity(verbosity)
        if bars:
            hf.enable_progress_bar()
        if dataset_bars:
            datasets.enable_progress_bars()
        for name, level in zip(self._LOGGERS, levels):
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(*exc)


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


def verdict_line(round_: int, overfit: bool, final: bool, reason: str) -> str:
    """What the run log says when the collapse rule (:mod:`sfedlora.driver.collapse`) speaks:
    overfitting (the training loss clearly below the trivial predictor's, held-out scores
    trivial) or a collapse, so far or for good."""
    what = "overfitting" if overfit else "training collapsed"
    if final:
        return f"round {round_}: {what}: {reason}"
    return f"round {round_}: {what} so far: {reason} (judged again over the whole run in summary.json)"
