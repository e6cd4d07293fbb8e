"""FedDPA (Yang et al., arXiv 2403.19211): a global adapter, averaged, and a personal adapter per
client, never sent, whose outputs the model adds.

Reference: ``Lydia-yang/FedDPA`` at commit cf638c1, FedDPA-T (``main.py --local_model True``).
Each layer computes W0·x + (1 − a)·γ·B_g A_g x + a·γ·B_l A_l x, a = ``local_weight`` = 0.5
(``code/peft/tuners/lora/layer.py``: the two adapters' outputs summed, not their matrices
blended; :mod:`sfedlora.lora.dual`). A round of a client (``main.py``,
``code/fed_utils/client.py``): from the second round on, first its personal adapter trains,
with the received global one active beside it and its branch detached (``set_local``); then
the global adapter trains alone, from the received one (``set_local`` is undone), and is
sent. The first round trains the global adapter only. The server takes the plain mean of the
global adapters (``code/fed_utils/model_aggregation.py``: ``weights_array`` of ones; by
examples with ``federation.client_weights=examples``). A client's personalised model is both
adapters with the same weights (``GlobalModel_generated.py`` with ``--local True``); the
global model is the global adapter alone.

Options (``docs/method.md``): ``federation.feddpa_weight`` (a); ``federation.feddpa_global_training=
mixed`` trains the global adapter with the personal one active beside it, detached (the
reference's ``glocal`` flag, off in its README's runs). Not implemented: the test-time
instance-wise weighting (``get_weight``: a from the similarity of a test input to a few of the
client's training inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import SfedloraError
from ...lora.dual import GLOBAL, GLOBAL_ONLY, PERSONAL, Mix
from ..kinds import KINDS, PERSONAL_KINDS
from .method import Method, Phase

if TYPE_CHECKING:
    from ...config import RunConfig


def _trained(round_: int) -> frozenset[str]:
    # The first round trains the global adapter alone; the personal one joins from the second.
    return frozenset({"A", "B", "head"} | (PERSONAL_KINDS if round_ > 1 else set()))


@dataclass(frozen=True)
class FedDPA(Method):
    def phases(self, round_: int, cfg: RunConfig) -> list[Phase]:
        kinds = self.trained(round_)
        personal, shared = kinds & PERSONAL_KINDS, kinds - PERSONAL_KINDS
        a = cfg.federation.feddpa_weight
        out = [Phase(personal, Mix(a, detached=GLOBAL))] if personal else []
        if shared:
            mixed = personal and cfg.federation.feddpa_global_training == "mixed"
            out.append(Phase(shared, Mix(a, detached=PERSONAL) if mixed else GLOBAL_ONLY))
        return out

    def mix(self, k: int | None, cfg: RunConfig) -> Mix:
        return GLOBAL_ONLY if k is None else Mix(cfg.federation.feddpa_weight)

    def check(self, cfg: RunConfig) -> None:
        if cfg.train.optimizer_state == "persistent":
            raise SfedloraError(
                "feddpa trains its two adapters one after the other each round, each with a fresh "
                "optimizer as its reference does: set train.optimizer_state=fresh"
            )


FEDDPA = FedDPA(
    "feddpa",
    frozenset(KINDS),
    _trained,
    "FedDPA: a global adapter (averaged) and a personal one (kept), their outputs mixed 1−a : a.",
    reference_weights="uniform",
    personal_adapter=True,
)
