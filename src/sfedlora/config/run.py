"""The whole run's configuration: every section, and the checks that span sections."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from ..federated.methods.presets import PRESETS
from ..lora.scaling import power_rule
from .federation import (
    EvalConfig,
    FaultConfig,
    FederationConfig,
    FlowerConfig,
    ServerConfig,
    SimulatorConfig,
    TrainConfig,
)
from .model import DataConfig, LoraSettings, ModelConfig, PartitionConfig, _Section
from .privacy import PrivacyConfig


class RunConfig(_Section):
    name: str | None = Field(None, description="Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(0, ge=0, description="Seeds data split, initialisation, sampling and client RNGs.")
    checkpoint_every: int = Field(
        1, ge=1, description="Write a resumable checkpoint every k rounds (removed once the run finishes)."
    )
    save_adapters: bool = Field(
        True,
        description=(
            "Save the final adapters in PEFT format (turn off for large sweeps that need only metrics)."
        ),
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        [],
        description=(
            "Backends that also get each round's metrics (server, evaluation, per client): tensorboard "
            "(event files in <run>/tensorboard) and/or wandb (<run>/wandb, offline unless WANDB_MODE is "
            'set); each needs the extra of its name: pip install "sfedlora[tensorboard]".'
        ),
    )
    method: str = Field("sfed-lora", description=f"One of {', '.join(PRESETS)}.")
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    server: ServerConfig = ServerConfig()
    faults: FaultConfig = FaultConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    flower: FlowerConfig = FlowerConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _resolve_method(self) -> RunConfig:
        if self.method not in PRESETS:
            raise ValueError(f"method: unknown method {self.method!r}; choose one of {', '.join(PRESETS)}")
        preset_rule = PRESETS[self.method][1]
        if preset_rule is not None:
            if self.lora.scaling not in (None, preset_rule):
                raise ValueError(
                    f"lora.scaling: method {self.method} uses scaling {preset_rule}, "
                    f"not {self.lora.scaling}; "
                    f"use method={PRESETS[self.method][0]} to choose the scaling freely"
                )
        resolved = self.lora.scaling or preset_rule or "lora"
        if self.lora.scaling != resolved:
            self.lora.scaling = resolved
        given = [k for k in ("n_exponent", "rank_exponent") if getattr(self.lora, k) is not None]
        if resolved == "power":
            # An unset exponent takes sfed's point, ½, so that a sweep's base may leave both to its grid.
            for key in {"n_exponent", "rank_exponent"} - set(given):
                setattr(self.lora, key, 0.5)
        elif given:
            raise ValueError(
                f"lora.{given[0]}: only the power rule has exponents, and this run's rule is {resolved}: "
                f"set lora.scaling=power (with a method without a preset rule, e.g. fedsa-lora) or drop "
                f"lora.{given[0]}"
            )
        return self

    @model_validator(mode="after")
    def _reachable_min_replies(self) -> RunConfig:
        sampled = self.federation.sampled_per_round()
        if self.server.min_replies > sampled:
            raise ValueError(
                f"server.min_replies ({self.server.min_replies}) exceeds the {sampled} clients "
                "sampled per round: "
                "no round could ever be averaged"
            )
        return self

    @model_validator(mode="after")
    def _eval_clients_exist(self) -> RunConfig:
        if self.eval.clients is not None and self.eval.clients > self.federation.n_clients:
            raise ValueError(
                f"eval.clients ({self.eval.clients}) exceeds "
                f"federation.n_clients ({self.federation.n_clients}): "
                "lower it, or drop it to evaluate every client"
            )
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> RunConfig:
        if self.lora.client_ranks is not None and (self.privacy.dp != "none" or self.privacy.secagg):
            # Clients train zero-padded to the full rank: DP noise would fill the padding (so a
            # rank-2 client would train at full rank within a round), and dp=server / SecAgg+
            # need every update in one shape.
            what = f"privacy.dp={self.privacy.dp}" if self.privacy.dp != "none" else "privacy.secagg"
            raise ValueError(f"{what} does not support lora.client_ranks (mixed ranks): drop one of them")
        if self.privacy.dp == "client" and self.model.precision == "fp16":
            # fp16 loss scaling multiplies the per-example gradients Opacus clips, so the
            # clipping bound (and with it the privacy guarantee) would be off by the scale.
            raise ValueError(
                "privacy.dp=client does not support model.precision=fp16 (loss scaling distorts "
                "per-example clipping): use bf16 or fp32"
            )
        if self.privacy.secagg and self.privacy.secagg_num_shares > self.federation.sampled_per_round():
            raise ValueError(
                f"privacy.secagg_num_shares ({self.privacy.secagg_num_shares}) exceeds the "
                f"{self.federation.sampled_per_round()} clients sampled per round"
            )
        return self

    @property
    def scaling(self) -> str:
        """The resolved rule as :func:`scaling.gamma` takes it: a name, or ``power(a=…, b=…)``."""
        assert self.lora.scaling is not None  # set by _resolve_method
        if self.lora.scaling == "power":
            return power_rule(self.lora.n_exponent, self.lora.rank_exponent)
        return self.lora.scaling
