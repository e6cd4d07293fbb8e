"""Many clients' optimizers as one: SGD and AdamW over stacked tensors (slot, *shape).

Each slot is one client. A step updates the slots asked for, each with its own learning
rate, by the very formulas of ``torch.optim.SGD`` and ``torch.optim.AdamW`` (single-tensor
form), so a client gets the update its own torch optimizer would give. A slot's state goes
in and out as that torch optimizer's ``state_dict``: clients move between engines freely.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from ..config import TrainConfig
from ..federated.client import make_optimizer


def _per_slot(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """The optimizers of ``slots`` clients over the stacked parameters ``names`` (in the
    order of the shared model's adapter parameters, which indexes a torch state_dict)."""

    def __init__(self, cfg: TrainConfig, stacks: Mapping[str, torch.Tensor], names: Sequence[str]):
        self.cfg, self.names, self.stacks = cfg, list(names), stacks
        self.adam = cfg.optimizer == "adamw"
        slots = next(iter(stacks.values())).shape[0]
        self.betas, self.eps = (0.9, 0.999), 1e-8  # torch's AdamW defaults, as make_optimizer leaves them
        self._keys = ("exp_avg", "exp_avg_sq") if self.adam else ("momentum_buffer",) if cfg.momentum else ()
        # Created on a tensor's first update: most runs train a few of the model's tensors.
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        # SGD: whether a slot's momentum buffer exists; AdamW: a slot's step count.
        self.started = {n: torch.zeros(slots, dtype=torch.bool) for n in self.names}
        self.steps = {n: torch.zeros(slots, dtype=torch.float64) for n in self.names}
        # Every slot's torch optimizer has the same groups: what make_optimizer gives.
        blanks = [torch.nn.Parameter(torch.empty(0)) for _ in self.names]
        self._groups = make_optimizer(blanks, cfg).state_dict()["param_groups"]

    def _state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.state:
            self.state[name] = {k: torch.zeros_like(self.stacks[name]) for k in self._keys}
        return self.state[name]

    def load(self, slot: int, state_dict: dict | None) -> None:
        """Give ``slot`` a client's torch optimizer state (None: a fresh optimizer)."""
        if not state_dict:
            return
        for i, entry in state_dict["state"].items():
            name = self.names[int(i)]
            held = self._state(name)
            for key in self._keys:
                held[key][slot] = entry[key].to(held[key].device)
            self.started[name][slot] = True
            if self.adam:
                self.steps[name][slot] = float(entry["step"])

    def state_dict(self, slot: int) -> dict:
        """``slot``'s state as its client's own torch optimizer would save it."""
        state = {}
        for i, name in enumerate(self.names):
            if name in self.state and self.started[name][slot]:
                # in torch's own key order
                entry = {"step": torch.tensor(float(self.steps[name][slot]))} if self.adam else {}
                entry.update({key: self.state[name][key][slot].clone() for key in self._keys})
                state[i] = entry
        # A copy each: torch's load_state_dict writes into the groups it is given.
        return {"state": state, "param_groups": copy.deepcopy(self._groups)}

    @torch.no_grad()
    def step(self, trained: Sequence[str], slots: torch.Tensor, lr: torch.Tensor) -> None:
        """Update the ``trained`` stacks at ``slots`` from their ``.grad``; ``lr`` per slot."""
        wd = self.cfg.weight_decay
        for name in trained:
            p, here = self.stacks[name], slots.cpu()
            x, g = p[slots], p.grad[slots]
            rate = _per_slot(lr, x)
            held = self._state(name)
            if self.adam:
                self.started[name][here] = True
                step = self.steps[name][here] + 1
                self.steps[name][here] = step
                b1, b2 = self.betas
                if wd:
                    x = x * (1 - rate * wd)
                m = held["exp_avg"][slots].lerp(g, 1 - b1)
                v = held["exp_avg_sq"][slots] * b2 + (1 - b2) * g * g
                held["exp_avg"][slots], held["exp_avg_sq"][slots] = m, v
                step_size = _per_slot((lr.double().cpu() / (1 - b1**step)).to(x.device), x)
                denom = v.sqrt() / _per_slot((1 - b2**step).sqrt().to(x.device), x) + self.eps
                x = x - step_size * (m / denom)
            else:
                d = g + wd * x if wd else g
                if self.cfg.momentum:
                    # torch starts the buffer as a copy of the first gradient
                    was = self.started[name][here].to(x.device).reshape(-1, *([1] * (x.dim() - 1)))
                    d = torch.where(was, held["momentum_buffer"][slots] * self.cfg.momentum + d, d)
                    held["momentum_buffer"][slots] = d
                    self.started[name][here] = True
                x = x - rate * d
            p[slots] = x
