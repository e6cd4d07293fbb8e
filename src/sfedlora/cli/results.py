"""The commands on finished runs: ``sfedlora report`` (tables and figures), ``sfedlora export``
and ``sfedlora evaluate`` (a run's models)."""

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

    @app.command()
    def report(
        path: Path = typer.Argument(..., help="A run directory, a sweep directory or a sweep's record file."),
        only: str | None = typer.Option(
            None,
            "--only",
            help="Just these figures, comma-separated names (heatmap_lr-0.2,metric_vs_round_lr-0.2); "
            "'' for none.",
        ),
        record: Path | None = typer.Option(
            None,
            "--record",
            help="Also write the sweep's record to this file (JSON; gzipped if it ends in .gz): every "
            "finished run's config, metrics and summary, from which this report regenerates.",
        ),
    ) -> None:
        """Render tables and figures for a finished run, a sweep, or a sweep's record.

        Into plots/ (PNG and PDF) and report.md for a directory; beside the file for a record."""
        from ..results.report import report as render

        try:
            out = render(path, None if only is None else set(only.split(",")), record)
        except SfedloraError as err:
            fail(str(err))
        console.print(f"report: {out}" + (f", record: {record}" if record else ""))

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
        push_to_hub: str | None = typer.Option(
            None,
            "--push-to-hub",
            metavar="REPO",
            help="Then upload the directory to this Hugging Face Hub model repo (created if missing; "
            "needs a login: huggingface-cli login or HF_TOKEN).",
        ),
    ) -> None:
        """Write a finished run's personalised (or global) model as a Hugging Face model directory,
        with a model card (README.md)."""
        from ..results.card import push_to_hub as push
        from ..results.export import export

        quiet_libraries()
        try:
            path = export(run, out, client, merge, push_to_hub)
        except SfedloraError as err:
            fail(str(err))
        what = "the global model" if client is None else f"client {client}'s model"
        kind = "merged weights" if merge else "PEFT adapter"
        console.print(f"{what} written to {path} ({kind}, tokenizer and model card README.md)")
        if push_to_hub is not None:
            try:
                url = push(path, push_to_hub)
            except SfedloraError as err:
                fail(str(err))
            console.print(f"uploaded to {url}")

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
