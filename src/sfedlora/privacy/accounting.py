"""Privacy accounting with Opacus's accountants: calibrate σ to a target ε up front, and
report the ε each client has spent so far.

Both DP modes are subsampled Gaussian mechanisms, accounted as Opacus accounts DP-SGD:

* ``dp=client``: client k runs DP-SGD on its own n_k examples, sampling each with rate
  q_k = batch_size / n_k, ``steps_per_round`` steps in every round it is sampled in. Its ε
  (for one of its examples) grows with the steps it has taken.
* ``dp=server``: every round releases one noisy mean of the sampled clients' clipped
  updates; a client is in it with rate q = clients per round / n_clients. Its ε (for its
  whole data) grows with the rounds played, whether it was sampled or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..config import PrivacyConfig, RunConfig


@lru_cache(maxsize=4096)
def epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε after ``steps`` subsampled Gaussian steps (σ, q), at δ, by an Opacus accountant."""
    if steps == 0:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=1024)
def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest σ (to Opacus's tolerance) that keeps ε ≤ ``target_epsilon`` after ``steps``."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP mechanism of a run, fixed before its first round: per client, the noise
    multiplier σ_k, the sampling rate q_k and the DP steps per round it is sampled in."""

    mode: str  # "client" or "server"
    delta: float
    clip_norm: float
    accountant: str
    noise_multiplier: np.ndarray  # [n_clients]
    sample_rate: np.ndarray  # [n_clients]
    steps_per_round: np.ndarray  # [n_clients]; 0 for clients never asked to train

    def spend(self, ledger: np.ndarray, sampled: list[int]) -> np.ndarray:
        """The ledger (DP steps each client is charged for) after a round with ``sampled``.

        dp=client charges every sampled client for its round's steps, even one that did not
        reply (a node that timed out may still have trained). dp=server charges every client
        one release per round: the accountant's sampling rate covers who was in it.
        """
        out = ledger.copy()
        if self.mode == "server":
            out += 1
        else:
            out[sampled] += self.steps_per_round[sampled]
        return out

    def epsilons(self, ledger: np.ndarray) -> np.ndarray:
        return np.array(
            [
                epsilon(float(s), float(q), int(t), self.delta, self.accountant)
                for s, q, t in zip(self.noise_multiplier, self.sample_rate, ledger)
            ]
        )

    def metrics(self, ledger: np.ndarray) -> dict:
        """What a round's record says about privacy: ε spent, worst and mean over clients."""
        eps = self.epsilons(ledger)
        return {"epsilon_max": float(eps.max()), "epsilon_mean": float(eps.mean()), "delta": self.delta}


def plan_privacy(cfg: RunConfig, client_sizes: np.ndarray, steps_per_round: np.ndarray) -> PrivacyPlan | None:
    """The run's DP mechanism, or None without DP.

    With a target ε, σ is calibrated up front for the whole run, assuming the worst case
    that a client is sampled in every round: then no client can exceed ε, and clients
    sampled less often end below it. dp=client calibrates each client to its own data
    size (its own q_k), as a real client would on its own.
    """
    p: PrivacyConfig = cfg.privacy
    if p.dp == "none":
        return None
    n = len(client_sizes)
    rounds = cfg.federation.rounds
    if p.dp == "server":
        rates = np.full(n, cfg.federation.sampled_per_round() / n)
        total_steps = np.full(n, rounds)
        per_round = np.ones(n, dtype=np.int64)
    else:
        rates = np.minimum(1.0, cfg.train.batch_size / client_sizes)
        per_round = steps_per_round.astype(np.int64)
        total_steps = per_round * rounds
    if p.noise_multiplier is not None:
        sigmas = np.full(n, p.noise_multiplier)
    else:
        sigmas = np.array(
            [
                noise_multiplier_for(p.epsilon, p.delta, float(q), int(t), p.accountant)
                for q, t in zip(rates, total_steps)
            ]
        )
    return PrivacyPlan(p.dp, p.delta, p.clip_norm, p.accountant, sigmas, rates, per_round)
