"""A finished run's models outside the run: rebuilt from its directory for export and scoring.

The base model is rebuilt from the run's ``config.yaml`` exactly as the run built it (its
data, its task's ``build_model``), then each client's saved adapter (``adapters/client_KK``,
or ``adapters/global``) is loaded with PEFT as any user would load it: at the client's own
rank and γ, with its trained task head (PEFT's ``modules_to_save``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..data import TaskData, load_task
from ..driver.rundir import RESTORE, read_json, read_run_config
from ..errors import SfedloraError, reading
from ..federated.shared import client_models_differ, method_of, split_clients
from ..lora.base import fold_saved_base_change
from ..lora.dual import activate, load_personal
from ..lora.models import Compute
from ..tasks import Task, get_task


@dataclass
class FinishedRun:
    """A finished run directory with its config, data and task rebuilt."""

    run_dir: Path
    cfg: RunConfig
    data: TaskData  # the run's own data: the model's classes, tokenizer and clients' label mixes
    task: Task
    compute: Compute

    @property
    def n_clients(self) -> int:
        return self.cfg.federation.n_clients

    def has_global_model(self) -> bool:
        return method_of(self.cfg).has_global_model()

    def client_models_differ(self) -> bool:
        return client_models_differ(self.cfg)

    def histograms(self):
        """Each client's training label counts (its size, without classes), as the run split them."""
        return self.task.histograms(self.data.train.labels, split_clients(self.cfg, self.data.train.labels))

    def check_client(self, k: int | None) -> None:
        """Refuse a client the run does not have, or the global model of a method without one."""
        if k is not None and not 0 <= k < self.n_clients:
            raise SfedloraError(
                f"--client {k} is out of range: {self.run_dir} has clients 0..{self.n_clients - 1}"
            )
        if k is None and not self.has_global_model():
            raise SfedloraError(
                f"{self.cfg.method} has no global model (each client keeps part of its adapter): "
                f"choose a client with --client K (0..{self.n_clients - 1})"
            )

    def adapter_dir(self, k: int | None) -> Path:
        """Where the run saved the adapter of client ``k`` (None: the global model)."""
        self.check_client(k)
        saved = self.run_dir / "adapters"
        if k is not None and (saved / f"client_{k:02d}").is_dir():
            return check_adapter(saved / f"client_{k:02d}")
        # Clients without local tensors and with one rank all run the global model.
        if (k is None or self.has_global_model()) and (saved / "global").is_dir():
            return check_adapter(saved / "global")
        name = "global" if k is None else f"client_{k:02d}"
        raise SfedloraError(
            f"{self.run_dir} holds no adapter {saved / name}: the run had save_adapters=false, or ran on "
            "Flower without flower.collect_adapters=true; run it again with them set"
        )


def check_adapter(path: Path) -> Path:
    """``path``, a saved adapter, once its config and its tensors' header read back (the
    header lists every tensor's place in the file, so a file cut short fails here too)."""
    from safetensors import safe_open

    read_json(path / "adapter_config.json", "adapter config", key="peft_type")
    weights = path / "adapter_model.safetensors"
    with reading(weights, "adapter", RESTORE), safe_open(str(weights), "pt") as f:
        f.keys()
    return path


def open_run(run_dir: str | Path) -> FinishedRun:
    """The finished run in ``run_dir``, refused if it is not one or has not finished."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise SfedloraError(
            f"{run_dir} has not finished (no summary.json): continue it with sfedlora run --resume {run_dir}"
        )
    data = load_task(cfg.data, seed=cfg.seed)
    task = get_task(data)
    return FinishedRun(
        run_dir, cfg, data, task, Compute.resolve(cfg.model.device, cfg.model.precision, cfg.model.attention)
    )


def base_model(run: FinishedRun):
    """The run's base model (head freshly initialised, no adapter) with the base change its
    method made (if any) folded in, and its tokenizer."""
    cfg = run.cfg
    model, tokenizer = run.task.build_model(cfg, run.compute, cfg.federation.sampled_per_round(), run.data)
    model = model.unload().to(run.compute.device)
    fold_saved_base_change(model, run.run_dir / "adapters")
    return model, tokenizer


def load_model(run: FinishedRun, k: int | None):
    """Client ``k``'s personalised model (None: the global one) as a PEFT model, and its tokenizer."""
    from peft import PeftModel

    path = run.adapter_dir(k)
    base, tokenizer = base_model(run)
    with reading(path, "adapter", RESTORE):
        model = PeftModel.from_pretrained(base, path)
        activate(model, load_personal(model, path, "default"))
    return model.eval(), tokenizer


def client_models(run: FinishedRun, ks: Sequence[int | None]) -> tuple[object, Iterator]:
    """The tokenizer, and (k, model) for every ``k`` of ``ks`` (None: the global model), on one
    base model with each adapter loaded in turn. Every adapter is checked before the first loads."""
    paths = [run.adapter_dir(k) for k in ks]
    base, tokenizer = base_model(run)
    return tokenizer, _in_turn(base, ks, paths)


def _in_turn(base, ks: Sequence[int | None], paths: Sequence[Path]) -> Iterator:
    from peft import PeftModel

    model, previous = None, []
    for i, (k, path) in enumerate(zip(ks, paths)):
        name = f"model_{i}"
        with reading(path, "adapter", RESTORE):  # tensors of shapes the base does not have
            if model is None:
                model = PeftModel.from_pretrained(base, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
            names = load_personal(model, path, name)  # FedDPA's client: its second adapter too
        if previous:
            model.set_adapter(name)
            for old in previous:
                model.delete_adapter(old)
        activate(model, names)
        previous = names
        yield k, model.eval()
