"""The ``sfedlora`` command line: a thin layer over functions you can call from Python."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..config import RunConfig, build_config, dump_config, load_config
from ..driver.rundir import read_summary
from ..errors import SfedloraError
from ..logs import quiet_libraries, round_lines, score_text
from .results import register_result_commands

app = typer.Typer(
    add_completion=False, no_args_is_help=False, help="Stable federated fine-tuning with LoRA (SFed-LoRA)."
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True)

ConfigArg = typer.Argument(
    None, help="YAML config; omit for the main job (MiniLM, bundled SST-2, 10 clients, SFed-LoRA)."
)
SetOpt = typer.Option(
    [], "--set", "-s", help="Override a config key: --set federation.rounds=20 (repeatable)."
)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(config: Path | None, overrides: list[str]) -> RunConfig:
    try:
        return load_config(config, overrides)
    except SfedloraError as err:
        _fail(str(err))


class Runtime(StrEnum):
    simulator = "simulator"
    flower = "flower"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
def run(
    config: Path | None = ConfigArg,
    overrides: list[str] = SetOpt,
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue this run directory from its last checkpoint."
    ),
    runtime: Runtime = typer.Option(
        Runtime.simulator,
        "--runtime",
        help="simulator: the embedded one; flower: Flower's simulation engine (one SuperNode per client).",
    ),
) -> None:
    """Run a federated fine-tuning experiment on the embedded simulator (or on Flower)."""
    from ..driver.experiment import headline
    from ..driver.experiment import run as run_experiment

    # On resume the run's own config.yaml rules; --set applies on top of it, and the result
    # (or a config file given instead) may differ from it only in keys that change no result.
    if resume is not None and config is None:
        saved = resume / "config.yaml"
        cfg = _load(saved, overrides) if overrides and saved.is_file() else None
    else:
        cfg = _load(config, overrides)
    quiet_libraries()
    progress = Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    state: dict = {}

    def on_start(fed, run_dir):
        state["key"] = headline(fed)
        c = fed.cfg
        plan = fed.ranks
        ranks = (
            f"client ranks {min(plan.ranks)}..{max(plan.ranks)} of r={c.lora.rank}"
            if plan.mixed
            else f"r={c.lora.rank}"
        )
        every = [plan.gamma(k) for k in range(len(plan.ranks))]
        gammas = f"γ={min(every):.4g}..{max(every):.4g}" if plan.mixed else f"γ={plan.gamma():.4g}"
        console.print(
            f"[bold]{c.method}[/] · {c.data.task} · {c.model.name_or_path} · {ranks} "
            f"· {c.federation.n_clients} clients ({fed.n_sampled} per round) · {c.scaling} {gammas}"
        )
        console.print(
            f"run directory: {run_dir}" + (f" (resumed after round {fed.round})" if fed.round else "")
        )
        state["run_dir"] = run_dir
        state["task"] = progress.add_task("", total=c.federation.rounds, completed=fed.round)
        progress.start()

    def on_record(record):
        for line in round_lines(record, state["key"], every_round=not console.is_terminal):
            progress.console.print(line)
        progress.update(state["task"], advance=1, description=f"loss {score_text(record['train_loss'])}")

    try:
        if runtime is Runtime.flower:
            from ..flower.engine import run_simulation

            result = run_simulation(cfg, on_start=on_start, on_record=on_record, resume=resume)
        else:
            result = run_experiment(cfg, on_start=on_start, on_record=on_record, resume=resume)
    except SfedloraError as err:
        progress.stop()
        _fail(str(err))
    except KeyboardInterrupt:
        progress.stop()
        if "run_dir" not in state:
            raise
        flower = " --runtime flower" if runtime is Runtime.flower else ""
        err_console.print(
            "interrupted: the last checkpoint is kept; continue with: "
            f"sfedlora run{flower} --resume {state['run_dir']}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    progress.stop()
    print_summary(result.summary, result.run_dir)


def print_summary(summary: dict, run_dir: Path) -> None:
    table = Table(title="summary", show_header=False)
    for k, v in summary.items():
        table.add_row(k, _fmt(v))
    table.add_row("run directory", str(run_dir))
    console.print(table)


@app.command()
def partition(config: Path | None = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Show how the training data is split: each client's size and label histogram."""
    from ..data import load_task
    from ..federated.shared import split_clients
    from ..tasks import get_task

    cfg = _load(config, overrides)
    quiet_libraries()
    try:
        data = load_task(cfg.data, seed=cfg.seed)
        task = get_task(data)
        task.check(cfg)
        parts = split_clients(cfg, data.train.labels)
    except SfedloraError as err:
        _fail(str(err))
    hist = task.histograms(data.train.labels, parts)
    desc = {
        "iid": "IID",
        "dirichlet": f"Dirichlet β={cfg.partition.beta} over labels",
        "size": f"sizes from Dirichlet β={cfg.partition.beta}",
    }[cfg.partition.kind]
    table = Table(title=f"{data.name}: {len(data.train)} training examples, {len(parts)} clients, {desc}")
    table.add_column("client", justify="right")
    table.add_column("size", justify="right")
    # The task's histogram columns: label counts where it has classes, else the size again.
    counts = task.has_classes
    for c in range(hist.shape[1] if counts else 0):
        table.add_column(f"label {c}", justify="right")
    for k, part in enumerate(parts):
        table.add_row(str(k), str(len(part)), *([str(c) for c in hist[k]] if counts else []))
    console.print(table)


@app.command()
def sweep(
    config: Path | None = typer.Argument(None, help="YAML run config, optionally with a grid: section."),
    grid: str | None = typer.Option(
        None, "--grid", "-g", help='Axes and values: "method=fedsa-lora,sfed-lora rank=4,8 seed=0,1".'
    ),
    overrides: list[str] = SetOpt,
    name: str | None = typer.Option(
        None, "--name", help="Sweep directory name under output_dir; reuse it to continue a sweep."
    ),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Cells run at once, each in its own process."),
    target: float | None = typer.Option(
        None, "--target", help="Report the first round each run reaches this metric value."
    ),
) -> None:
    """Run a grid of experiments, one run directory per cell; finished cells are skipped."""
    from datetime import datetime

    from ..results.sweep import cell_name, grid_cells, load_sweep, run_sweep

    try:
        base, axes = load_sweep(config, grid, overrides)
    except SfedloraError as err:
        _fail(str(err))
    quiet_libraries()
    # The base tree holds only what the YAML and --set give: the output_dir default comes from the
    # config model.
    sweep_dir = Path(build_config(base).output_dir) / (name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}")
    total = len(grid_cells(axes))
    console.print(f"sweep of {total} runs into {sweep_dir} ({jobs} at a time)")
    count = {"n": 0}

    def on_cell(cell, run_dir, skipped):
        count["n"] += 1
        summary = run_dir / "summary.json"
        final = read_summary(run_dir)["final"] if summary.is_file() else None
        console.print(
            f"[{count['n']}/{total}] {cell_name(cell)}: "
            + ("already finished, skipped" if skipped else f"final {_fmt(final)}")
        )

    try:
        run_sweep(base, axes, sweep_dir, jobs=jobs, on_cell=on_cell, target=target)
    except SfedloraError as err:
        _fail(str(err))
    console.print(f"summary: {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.md'}")


register_result_commands(app, _fail, console)

flower_app = typer.Typer(help="Run on Flower's Deployment Engine (SuperLink and SuperNodes).")
app.add_typer(flower_app, name="flower")


@flower_app.command("up")
def flower_up(
    config: Path | None = ConfigArg,
    overrides: list[str] = SetOpt,
    clients: int | None = typer.Option(
        None, "--clients", min=1, help="SuperNodes to start, one per client (sets federation.n_clients)."
    ),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Certificates, keys and process logs (default: a new temporary directory)."
    ),
    timeout: float = typer.Option(
        3600.0, "--timeout", help="Seconds the run may take before everything is stopped."
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue this run directory (with the --workdir it started in)."
    ),
) -> None:
    """Start a SuperLink and one SuperNode per client on 127.0.0.1 (TLS, SuperNode
    authentication), run the job, and stop everything."""
    import tempfile

    from ..flower.deploy import up

    if resume is not None and config is None:  # the run's own config, as `sfedlora run --resume`
        config = resume / "config.yaml"
    cfg = _load(config, [*overrides, *([f"federation.n_clients={clients}"] if clients else [])])
    workdir = workdir or Path(tempfile.mkdtemp(prefix="sfedlora-flower-"))
    console.print(
        f"deployment: 1 SuperLink + {cfg.federation.n_clients} SuperNodes on 127.0.0.1 "
        "(TLS, node authentication); "
        f"logs in {workdir / 'logs'}"
    )

    def on_record(record):
        # Where the run is judged (the task's metric) the ServerApp knows; the summary names it.
        for line in round_lines(record, None, every_round=True):
            console.print(line)

    try:
        run_dir = up(cfg, workdir, timeout=timeout, on_record=on_record, resume=resume)
    except SfedloraError as err:
        _fail(str(err))
    print_summary(read_summary(run_dir), run_dir)


def _sweep_text(config: Path, overrides: list[str]) -> str:
    """A sweep file as it runs: its base config resolved, then its grid (every cell checked)."""
    import yaml

    from ..results.sweep import load_sweep

    base, grid = load_sweep(config, None, overrides)
    resolved = build_config(base).model_dump(mode="json")
    # A method axis brings each cell its preset's scaling rule unless the base fixes one;
    # the base's own method would pin its rule on every cell of the printed sweep.
    if "method" in grid and (base.get("lora") or {}).get("scaling") is None:
        resolved["lora"]["scaling"] = None
    return yaml.safe_dump(resolved, sort_keys=False) + yaml.safe_dump(
        {"grid": grid}, sort_keys=False, default_flow_style=None
    )


@app.command("plan")
def show_plan(config: Path | None = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Print the parameter counts and the memory a run needs (base, clients' states, activations),
    and whether it fits the device found, from the model's config.json alone (nothing is loaded)."""
    from ..config import read_yaml_mapping
    from ..driver.plan import plan

    quiet_libraries()
    try:
        if config is not None and "grid" in read_yaml_mapping(config):  # a sweep: its base config
            from ..results.sweep import load_sweep

            cfg = build_config(load_sweep(config, None, overrides)[0])
        else:
            cfg = load_config(config, overrides)
        lines = plan(cfg).lines
    except SfedloraError as err:
        _fail(str(err))
    console.print("\n".join(lines), highlight=False)


@app.command("config")
def show_config(config: Path | None = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Print the fully resolved config (the defaults when no file is given); for a sweep file
    (one with a grid: section), its resolved base config and then its grid."""
    from ..config import read_yaml_mapping

    try:
        if config is not None and "grid" in read_yaml_mapping(config):
            text = _sweep_text(config, overrides)
        else:
            text = dump_config(load_config(config, overrides))
    except SfedloraError as err:
        _fail(str(err))
    sys.stdout.write(text)


if __name__ == "__main__":
    app()
