"""Opacus glue for client DP-SGD: per-example gradients of the adapter's tensors.

Opacus's ``GradSampleModule`` puts hooks on every module with trainable parameters (the
``nn.Linear`` of each LoRA A and B, and of the task head); after ``backward()`` each
trainable parameter holds ``grad_sample`` [batch, *shape]. The hooks are put on for one
client's training and taken off after it: which modules train changes between rounds
(RoLoRA, head probing, FFA-LoRA's frozen A), and Opacus fails on a hooked module that is
frozen but still passes gradients on (A in front of a trained B).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .mechanisms import private_gradient


@dataclass(frozen=True)
class DPSGD:
    """One client's DP-SGD settings (from the run's :class:`PrivacyPlan`)."""

    clip_norm: float
    noise_multiplier: float
    sample_rate: float  # Poisson rate q: each example is in a batch with this probability
    secure_noise: bool = False

    def noise_generator(self, seeded: torch.Generator) -> torch.Generator:
        """The client's seeded generator, or one seeded by the OS with ``secure_noise``."""
        if not self.secure_noise:
            return seeded
        return torch.Generator().manual_seed(secrets.randbits(63))


@contextmanager
def per_example_gradients(model: torch.nn.Module):
    """Within the block, ``backward()`` leaves ``grad_sample`` on every parameter that
    requires a gradient now; afterwards the hooks and their attributes are gone."""
    from opacus import GradSampleModule

    # loss_reduction="mean": the model returns the batch's mean loss, so Opacus scales
    # the backward signal by the batch size to recover per-example gradients.
    sampler = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        yield sampler
    finally:
        sampler.cleanup()


def apply_private_gradient(
    params: Mapping[str, torch.nn.Parameter],
    dp: DPSGD,
    expected_batch_size: float,
    generator: torch.Generator,
) -> None:
    """Replace the gradients of the trained ``params`` by their DP-SGD gradient and clear
    the per-example ones (Opacus would otherwise accumulate them across steps)."""
    trained = {n: p for n, p in params.items() if p.requires_grad}
    # bf16 autocast gives bf16 per-example gradients: clip and noise in fp32.
    samples = {
        n: p.grad_sample.float() for n, p in trained.items() if getattr(p, "grad_sample", None) is not None
    }
    grads = private_gradient(
        samples,
        {n: p.shape for n, p in trained.items()},
        dp.clip_norm,
        dp.noise_multiplier,
        expected_batch_size,
        generator,
    )
    for n, p in trained.items():
        p.grad = grads[n].to(device=p.device, dtype=p.dtype)
        p.grad_sample = None
