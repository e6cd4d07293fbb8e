"""How the federation trains: rounds, local training, evaluation, faults, the server, the runtimes."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from .model import _Section


class FederationConfig(_Section):
    n_clients: int = Field(10, ge=1, description="Clients in the federation.")
    clients_per_round: int | None = Field(None, ge=1, description="Clients sampled per round (default: all).")
    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Alternative to clients_per_round: fraction of clients sampled, "
        "int(fraction · n_clients) and at least 1, as Flower's strategies round it.",
    )
    rounds: int = Field(40, ge=1, description="Communication rounds.")
    local_steps: int | None = Field(10, ge=1, description="Optimizer steps per client per round.")
    local_epochs: float | None = Field(
        None, gt=0, description="Alternative to local_steps: passes over the client's data per round."
    )
    local_head: bool = Field(False, description="Keep the task head on the client instead of averaging it.")
    head_probe_rounds: int = Field(
        0,
        ge=0,
        description=(
            "First train only the head for this many rounds (a linear probe), then freeze it and train "
            "only the adapter; 0 trains both throughout; equal to rounds, only the head ever trains "
            "(the linear-probe baseline an adapter's gain is measured against)."
        ),
    )
    client_weights: Literal["reference", "examples", "uniform"] = Field(
        "reference",
        description=(
            "How the server weighs clients in its mean: as the method's reference code does "
            "(FedEx-LoRA equally, the others by training examples; docs/method.md), by examples, "
            "or equally."
        ),
    )
    flora_reinit: Literal["fresh", "initial"] = Field(
        "fresh",
        description=(
            "FLoRA: after each round's merge the LoRA starts anew, with A drawn fresh (the "
            "reference's) or back at the run's initial A; B is zero either way."
        ),
    )
    feddpa_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "FedDPA: a, the personal adapter's weight in a personalised model (the global "
            "adapter's is 1 - a), in training and evaluation (the reference's local_weight)."
        ),
    )
    feddpa_global_training: Literal["alone", "mixed"] = Field(
        "alone",
        description=(
            "FedDPA: the global adapter trains alone after the personal one (the reference's "
            "default), or with the personal adapter active beside it, detached (its glocal flag)."
        ),
    )
    hetlora_prune_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "HetLoRA's local rank self-pruning, off when null: the decay γ (e.g. 0.99 or 0.9). "
            "A client of rank r adds hetlora_prune_weight × the norm of its tail (its rank "
            "components from ⌊γ r⌋ on) to its local loss and, when that norm shrank in the round's "
            "training, prunes to rank ⌊γ r⌋ (at least hetlora_min_rank) and sends the smaller "
            "adapter from then on. Per-client engine; docs/method.md."
        ),
    )
    hetlora_prune_weight: float = Field(
        0.01, ge=0, description="HetLoRA's rank self-pruning: the regulariser's weight λ."
    )
    hetlora_min_rank: int = Field(
        1, ge=1, description="HetLoRA's rank self-pruning: no client prunes below this rank."
    )
    hetlora_prune_norm: Literal["product", "factors"] = Field(
        "product",
        description=(
            "HetLoRA's rank self-pruning: the tail's norm, ‖B_tail A_tail‖_F of each layer (the "
            "paper's) or ‖B_tail‖_F·‖A_tail‖_F (a public re-implementation's), summed over layers."
        ),
    )

    @model_validator(mode="after")
    def _one_way_each(self) -> FederationConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set clients_per_round or fraction, not both")
        if self.clients_per_round is not None and self.clients_per_round > self.n_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds n_clients ({self.n_clients})"
            )
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs")
        if self.head_probe_rounds > self.rounds:
            raise ValueError(
                f"head_probe_rounds ({self.head_probe_rounds}) exceeds rounds ({self.rounds}); "
                "set it to rounds for a head-only (linear probe) run"
            )
        return self

    def sampled_per_round(self) -> int:
        """N in the scaling rule: the number of client updates averaged in a round."""
        if self.clients_per_round is not None:
            return self.clients_per_round
        if self.fraction is not None:
            # Flower's strategies sample int(fraction · available), at least one: floor, not
            # Python's round (which rounds 2.5 to 2 and 3.5 to 4).
            return max(1, int(self.fraction * self.n_clients))
        return self.n_clients


class TrainConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Client optimizer.")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW) or L2 (SGD).")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    optimizer_state: Literal["fresh", "persistent"] = Field(
        "fresh",
        description="fresh: a new optimizer and learning-rate schedule at the start of every round's "
        "local training, as FedSA-LoRA's reference code (FederatedScope) does; persistent: each client's "
        "optimizer state (AdamW moments, SGD momentum) and schedule carried from round to round. "
        "See docs/method.md.",
    )
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="Learning-rate decay after warm-up: over each round's local steps "
        "(optimizer_state=fresh), or over each client's steps in the whole run (persistent).",
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear warm-up, counted in each client's own steps (per round when fresh)."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm; null disables."
    )
    batch_size: int = Field(16, ge=1, description="Examples per local step.")
    group_by_length: bool = Field(
        True, description="Batch a round's examples by length to cut padding (batch order stays random)."
    )


class EvalConfig(_Section):
    every: int = Field(20, ge=1, description="Evaluate every k rounds (and always after the last).")
    batch_size: int = Field(128, ge=1, description="Examples per evaluation batch.")
    personalised: bool = Field(
        True, description="Evaluate every client's personalised model (shared + local tensors)."
    )
    clients: int | None = Field(
        None,
        ge=1,
        description=(
            "Evaluate the personalised models of this many clients only: a sample drawn once from the "
            "seed, the same clients at every evaluation so rounds compare (null: every client). "
            "Personalised evaluation costs a dev-set pass per client, which dominates large-N runs. "
            "The client-local scores (client_test_fraction) cover every client regardless."
        ),
    )
    client_test_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Hold out this share of each client's partition as its own test data, and score every "
            "client's personalised model on its own share (FedSA-LoRA's protocol: client_test_* metrics, "
            "beside the dev-set scores); the client trains on the rest. 0: off. Embedded simulator only."
        ),
    )
    max_new_tokens: int = Field(
        256, ge=1, description="gsm8k: tokens generated (greedily) per evaluation answer."
    )
    judged_on: Literal["dev", "local"] = Field(
        "dev",
        description=(
            "What a run is judged by (final/best score, collapse): the personalised models on the whole "
            "dev set, or under each client's own training label mix (classification; the client-local test "
            "data of FedSA-LoRA's protocol, for non-IID splits)."
        ),
    )


class FaultConfig(_Section):
    """Injected client faults, for testing and robustness studies (all off by default)."""

    dropout: float = Field(
        0.0, ge=0, le=1, description="Probability that a sampled client never replies in a round."
    )
    bad_update: float = Field(
        0.0, ge=0, le=1, description="Probability that a reply is corrupted (one of bad_kinds, at random)."
    )
    bad_kinds: list[Literal["nan", "inf", "shape", "scale"]] = Field(
        ["nan", "inf", "shape", "scale"],
        min_length=1,
        description="Corruptions: a NaN or Inf entry, a wrong shape, the change scaled by 1e6.",
    )


class ServerConfig(_Section):
    """What the server accepts. Non-finite and wrong-shaped updates are always refused."""

    outlier_rule: Literal["none", "median"] = Field(
        "none", description="median: refuse updates whose change norm exceeds outlier_factor x the median's."
    )
    outlier_factor: float = Field(10.0, gt=1, description="Threshold of the median rule.")
    min_replies: int = Field(
        1,
        ge=1,
        description=(
            "Sound replies a round needs to be averaged; with fewer, the server's tensors stay as they were."
        ),
    )


class SimulatorConfig(_Section):
    """The embedded simulator (sfedlora run without --runtime flower)."""

    workers: int | Literal["auto"] = Field(
        "auto",
        description=(
            "Processes that train the round's clients (and evaluate personalised models) side by side, "
            "each with one torch thread and the frozen base model shared copy-on-write; the same results "
            "as one process, up to float rounding. auto: one per torch thread on a CPU (so 2 on a 2-core "
            "machine, 1 inside a sweep running a cell per core), 1 on a GPU; CPU only. The fused engine "
            "is split the same way: each process fuses its share of the round's clients."
        ),
    )

    engine: Literal["auto", "per-client", "fused"] = Field(
        "auto",
        description=(
            "per-client: each sampled client's local steps alone (in this process, or in `workers`); "
            "fused: the round's clients in lockstep, local step t of all of them one batched computation "
            "(rows sorted by length across clients, each row through its own client's adapter); the same "
            "results up to float rounding and dropout masks (docs/architecture.md). auto: fused on a GPU, "
            "and on a CPU where clients take one local step a round; per-client otherwise (the faster "
            "one measured, benchmarks/README.md)."
        ),
    )
    fused_clients: int = Field(
        128,
        ge=1,
        description=(
            "fused engine: clients trained together at most (a round's sampled clients go in groups of "
            "this many); bounds the memory of their stacked adapters, gradients and optimizer state."
        ),
    )
    fused_tokens: int = Field(
        1024,
        ge=1,
        description=(
            "fused engine: padded tokens (rows x longest row) per micro-batch; bounds its activation memory. "
            "Larger batches use the cores better but re-add padding."
        ),
    )

    @field_validator("workers")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be at least 1 (or auto)")
        return v


class FlowerConfig(_Section):
    # The docstring is rendered verbatim into docs/config-reference.md, so it stays one line.
    """The Flower runtime (``sfedlora run --runtime flower``, ``flwr run .``); the embedded simulator ignores it."""  # noqa: E501

    round_timeout: float = Field(
        600.0,
        gt=0,
        description=(
            "Seconds the server waits for a round's replies; clients silent by then count as dropped and "
            "the round goes on without them."
        ),
    )
    connect_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds the server waits at the start for one SuperNode per client to connect.",
    )
    client_cpus: float = Field(
        1.0,
        gt=0,
        description=(
            "Flower simulation: CPU cores reserved per ClientApp (clients train concurrently as cores allow)."
        ),
    )
    collect_adapters: bool = Field(
        False,
        description=(
            "At the end of the run each SuperNode sends its personalised adapter to the server, which "
            "saves it under adapters/client_XX as the embedded simulator does; otherwise personalised "
            "adapters stay on the nodes (saved there with the node config key state-dir)."
        ),
    )
    client_gpus: float = Field(
        0.0,
        ge=0,
        description=(
            "Flower simulation: share of a GPU per ClientApp (0.25 lets four share one); 0 trains clients "
            "on the CPU."
        ),
    )
