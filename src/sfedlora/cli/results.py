"""The commands on a finished run's models: ``sfedlora export`` and ``sfedlora evaluate``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import SfedloraError
from ..logs import quiet_libraries, score_text

RunArg = typer.Argument(..., help="A finished run directory.")


def register_result_commands(app: typer.Typer, fail: Callable[[str], None], console: Console) -> None:
    """Add the commands to ``app``; ``fail`` prints a one-line error and exits 2."""

    @app.command("export")
    def export_model(
        run: Path = RunArg,
        out: Path = typer.Argument(..., help="Directory to write (new or empty)."),
        client: int | None = typer.Option(
            None, "--client", help="Client K's personalised model; omit for the global model."
        ),
        merge: bool = typer.Option(
            False,
            "--merge",
            help="Merge the adapter into the weights: a plain Hugging Face model that "
            "transformers.pipeline loads. Without: a PEFT adapter directory.",
        ),
    ) -> None:
        """Write a finished run's personalised (or global) model as a Hugging Face model directory."""
        from ..results.export import export

        quiet_libraries()
        try:
            path = export(run, out, client, merge)
        except SfedloraError as err:
            fail(str(err))
        what = "the global model" if client is None else f"client {client}'s model"
        kind = "merged weights" if merge else "PEFT adapter"
        console.print(f"{what} written to {path} ({kind} and tokenizer)")

    @app.command()
    def evaluate(
        run: Path = RunArg,
        data: Path = typer.Option(
            ...,
            "--data",
            help="Labelled examples: a GLUE TSV file or directory for a GLUE run; CSV, TSV, JSON or "
            "JSONL with the run's columns for a data.source=files run.",
        ),
        client: int | None = typer.Option(
            None, "--client", help="Score client K's personalised model only; omit to score every model."
        ),
    ) -> None:
        """Score a finished run's personalised (or global) models on new labelled data; writes nothing."""
        from ..results.rescore import evaluate_run

        quiet_libraries()
        try:
            scores = evaluate_run(run, data, client)
        except SfedloraError as err:
            fail(str(err))
        # constant_predictions is the collapse rule's 0/1 flag, not a score to read in a table.
        metrics = [m for m in next(iter(scores.values())) if m != "constant_predictions"]
        table = Table("model", *metrics, title=f"{run} on {data}")
        for name, row in scores.items():
            table.add_row(name, *(score_text(row.get(m)) for m in metrics))
        console.print(table)
