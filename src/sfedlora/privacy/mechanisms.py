"""The DP mechanisms as pure functions over tensors: clipping and Gaussian noise.

Client DP-SGD (Abadi et al. 2016, as Opacus does it): clip every example's gradient to
L2 norm ``C``, sum, add N(0, (σC)²) to every coordinate, divide by the expected batch
size. Server-side user-level DP (DP-FedAvg, McMahan et al. 2018, as Flower's
``DifferentialPrivacyServerSideFixedClipping`` does it): clip every client's change to
norm ``C``, average uniformly, add N(0, (σC / m)²). The server path calls Flower's own
clipping and standard-deviation functions, so it is Flower's math, not a copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

# Opacus's guard against dividing by a zero norm (opacus.optimizers.optimizer).
_EPS = 1e-6


def per_example_norms(grad_samples: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each example's gradient over all tensors; grad_samples[name] is [batch, *shape]."""
    squares = [g.reshape(len(g), -1).double().pow(2).sum(1) for g in grad_samples.values()]
    return torch.stack(squares).sum(0).sqrt()  # [batch]


def clip_per_example(grad_samples: Mapping[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """Each example's gradient scaled to L2 norm at most ``clip_norm`` (Opacus's flat clipping).

    The norm is taken over all trained tensors together, so the bound holds for the whole
    gradient of an example: that is the sensitivity the noise is calibrated to.
    """
    factor = (clip_norm / (per_example_norms(grad_samples) + _EPS)).clamp(max=1.0)  # [batch]
    return {n: g * factor.to(g.dtype).view(-1, *([1] * (g.dim() - 1))) for n, g in grad_samples.items()}


def gaussian_noise(like: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std²) noise shaped like ``like``, drawn on the CPU from ``generator`` (so a
    seeded run replays exactly on any device)."""
    noise = torch.normal(0.0, std, size=like.shape, generator=generator, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def private_gradient(
    grad_samples: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One DP-SGD gradient: (Σ clipped per-example gradients + N(0, (σC)²)) / expected batch size.

    ``grad_samples`` may be empty (a Poisson batch with no example): the gradient is then
    noise alone, as the mechanism requires. Dividing by the *expected* batch size, not the
    drawn one, keeps the batch size from depending on the data (Opacus does the same).
    """
    clipped = clip_per_example(grad_samples, clip_norm) if grad_samples else {}
    sums = {name: c.sum(0).float() for name, c in clipped.items()}
    return noisy_mean(sums, shapes, clip_norm, noise_multiplier, expected_batch_size, generator)


def noisy_mean(
    sums: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The second half of :func:`private_gradient`, from the sums of clipped per-example
    gradients (a missing sum is zero): noise drawn tensor by tensor in ``shapes``' order."""
    out = {}
    for name, shape in shapes.items():
        total = sums[name] if name in sums else torch.zeros(shape)
        out[name] = (
            total + gaussian_noise(total, noise_multiplier * clip_norm, generator)
        ) / expected_batch_size
    return out


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator) -> list[np.ndarray]:
    """``steps`` batches in which every example is included independently with
    probability ``sample_rate``: the sampling the privacy accountant assumes."""
    return [
        torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten().numpy()
        for _ in range(steps)
    ]


def clip_update(
    update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clip_norm: float
) -> dict[str, torch.Tensor]:
    """``reference`` + the change ``update - reference`` scaled to L2 norm at most ``clip_norm``
    (over all tensors together), by Flower's ``compute_clip_model_update``."""
    from flwr.supercore.differential_privacy import compute_clip_model_update  # imported late: flwr is heavy

    names = sorted(update)
    arrays = [update[n].detach().cpu().double().numpy() for n in names]
    references = [reference[n].detach().cpu().double().numpy() for n in names]
    # Flower divides by the change's norm: an unchanged update (a client whose step
    # moved nothing) would raise ZeroDivisionError, and needs no clipping anyway.
    if any(np.any(a != r) for a, r in zip(arrays, references)):
        compute_clip_model_update(arrays, references, clip_norm)
    return {n: torch.from_numpy(a).to(update[n].dtype) for n, a in zip(names, arrays)}


def user_level_mean(
    updates: Sequence[Mapping[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Server-side DP aggregate: uniform mean of the clipped updates + N(0, (σC / m)²).

    The mean is uniform, not weighted by example counts: with weights one client could
    move the mean by more than C / m and the noise would not cover it (Flower requires
    equal weights for the same reason). m is the number of updates averaged, so σ stays
    the ratio of the noise to the mean's sensitivity C / m even when clients drop out.
    """
    from flwr.supercore.differential_privacy import compute_stdv

    if not updates:
        raise ValueError("cannot aggregate zero updates")
    clipped = [clip_update(u, reference, clip_norm) for u in updates]
    std = compute_stdv(noise_multiplier, clip_norm, len(clipped))
    out = {}
    for name in sorted(clipped[0]):
        mean = torch.stack([c[name].double() for c in clipped]).mean(0)
        noise = torch.from_numpy(rng.normal(0.0, std, size=tuple(mean.shape)))
        out[name] = (mean + noise).to(updates[0][name].dtype)
    return out
