"""Differential privacy (client DP-SGD, server-side user-level DP) and its accounting.

``mechanisms`` holds the math as pure functions, ``accounting`` Opacus's accountants and
the up-front noise calibration, ``dpsgd`` the Opacus per-example-gradient glue. Secure
aggregation (Flower's SecAgg+) lives in ``sfedlora.flower.secagg``.
"""

from .accounting import PrivacyPlan, epsilon, noise_multiplier_for, plan_privacy
from .dpsgd import DPSGD, apply_private_gradient, per_example_gradients
from .mechanisms import (
    clip_per_example,
    clip_update,
    per_example_norms,
    poisson_batches,
    private_gradient,
    user_level_mean,
)

__all__ = [
    "DPSGD",
    "PrivacyPlan",
    "apply_private_gradient",
    "per_example_gradients",
    "clip_per_example",
    "clip_update",
    "epsilon",
    "noise_multiplier_for",
    "per_example_norms",
    "plan_privacy",
    "poisson_batches",
    "private_gradient",
    "user_level_mean",
]
