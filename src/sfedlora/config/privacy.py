"""Differential privacy and secure aggregation settings."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from .model import _Section


class PrivacyConfig(_Section):
    """Differential privacy and secure aggregation (all off by default); see docs/privacy.md."""

    dp: Literal["none", "client", "server"] = Field(
        "none",
        description=(
            "client: DP-SGD on each client (per-example clipping + Gaussian noise; protects each training "
            "example); server: the server clips each client's update and adds Gaussian noise to their mean "
            "(protects each client's whole data); none: no DP."
        ),
    )
    epsilon: float | None = Field(
        None,
        gt=0,
        description=(
            "Target ε over the whole run; the noise multiplier is calibrated to it before the first round. "
            "Set this or noise_multiplier."
        ),
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description=(
            "Noise standard deviation divided by clip_norm, instead of a target ε (ε is then reported, not "
            "targeted)."
        ),
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description=(
            "δ of the (ε, δ) guarantee; keep it below 1 / (examples per client) for dp=client, 1 / "
            "n_clients for dp=server."
        ),
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        description=(
            "L2 bound C: on each example's gradient (dp=client, replacing train.max_grad_norm) or on each "
            "client's update (dp=server)."
        ),
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp",
        description=(
            "Opacus privacy accountant: rdp (Rényi DP) or prv (privacy random variables; tighter, slower)."
        ),
    )
    secure_noise: bool = Field(
        False,
        description=(
            "Draw DP noise from a generator seeded by the OS instead of the run's seed, so it cannot be "
            "replayed from the config (runs are then not repeatable)."
        ),
    )
    secagg: bool = Field(
        False,
        description=(
            "Flower runtime only: aggregate with Flower's SecAgg+, so the server sees only the sum of the "
            "clients' updates."
        ),
    )
    secagg_clipping_range: float = Field(
        8.0,
        gt=0,
        description=(
            "SecAgg+: updates are quantised on [-range, range]; entries of a client's change beyond it are "
            "clipped."
        ),
    )
    secagg_num_shares: int = Field(
        3, ge=3, description="SecAgg+: clients each client shares its secrets with (Flower's num_shares)."
    )
    secagg_threshold: int = Field(
        2,
        ge=2,
        description=(
            "SecAgg+: shares needed to reconstruct a dropped client's mask (Flower's "
            "reconstruction_threshold; below secagg_num_shares)."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("set epsilon or noise_multiplier, not both")
        if self.dp != "none" and self.epsilon is None and self.noise_multiplier is None:
            raise ValueError(f"dp={self.dp} needs a target epsilon or a noise_multiplier")
        if self.dp == "none" and (self.epsilon is not None or self.noise_multiplier is not None):
            raise ValueError("epsilon / noise_multiplier need dp=client or dp=server")
        if self.secagg and self.dp == "server":
            raise ValueError(
                "dp=server clips each client's update on the server, which SecAgg+ hides from it: "
                "use dp=client with secagg, or turn secagg off"
            )
        if self.secagg_threshold >= self.secagg_num_shares:
            raise ValueError(
                f"secagg_threshold ({self.secagg_threshold}) must be below "
                f"secagg_num_shares ({self.secagg_num_shares})"
            )
        return self
