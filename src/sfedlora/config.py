"""Typed run configuration: pydantic models, YAML loading and ``--set a.b=c`` overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import SfedloraError
from .methods import PRESETS
from .scaling import ScalingRule


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "minilm",
        description="Hub id or local path of the base model; 'minilm' is the bundled all-MiniLM-L6-v2.",
    )
    target_modules: list[str] | None = Field(
        None,
        description="Modules that get LoRA; default per architecture (query/value for BERT-like models; q_proj, k_proj, v_proj, o_proj for LLaMA-like causal LMs).",
    )
    lora_mlp: bool = Field(
        False,
        description="Causal LMs: also put LoRA on the MLP projections (LLaMA: gate_proj, up_proj, down_proj) when target_modules is not set.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: much less GPU memory for long sequences (LLaMA-2-7B), for one more forward pass of compute.",
    )
    max_length: int = Field(128, gt=0, description="Tokens per example after truncation.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Forward-pass precision (torch.autocast); auto = bf16 where the GPU or CPU (AVX512-BF16, AMX) runs it fast, else fp32; fp16 (GPUs without bf16) adds loss scaling. Adapters and optimizer state stay fp32; a causal LM's frozen base weights are stored in bf16/fp16 on a GPU.",
    )


class LoraSettings(_Section):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="α in the scaling rule.")
    scaling: ScalingRule | None = Field(
        None, description="lora (α/r), rslora (α/√r) or sfed (α·√(N/r)); default set by the method preset."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    client_ranks: list[int] | None = Field(
        None,
        description="Per-client LoRA ranks, cycled over the clients (client k gets entry k mod length), each at most lora.rank, the rank the server keeps A at; null: every client at lora.rank. See docs/mixed-ranks.md.",
    )

    @field_validator("client_ranks")
    @classmethod
    def _client_ranks_fit(cls, ranks: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if ranks is None:
            return ranks
        if not ranks:
            raise ValueError(
                "empty list: give ranks to cycle over the clients, e.g. [4, 16, 64], "
                "or null for lora.rank everywhere"
            )
        if min(ranks) < 1:
            raise ValueError(f"every rank must be a positive integer, got {min(ranks)}")
        rank = info.data.get("rank")
        if rank is not None and max(ranks) > rank:
            raise ValueError(
                f"rank {max(ranks)} exceeds lora.rank={rank}, the rank the server keeps A at; "
                f"set lora.rank={max(ranks)} (or higher)"
            )
        return ranks


class DataConfig(_Section):
    task: str = Field(
        "sst2",
        description="GLUE task name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), a causal-LM task (gsm8k, alpaca) or any other name for your own classification data.",
    )
    source: Literal["bundled", "tsv", "hub", "files"] = Field(
        "bundled",
        description="bundled SST-2 sample, GLUE TSV directory, Hugging Face hub, or your own files (gsm8k/alpaca: JSON or JSONL).",
    )
    data_dir: str | None = Field(
        None, description="For source=tsv: directory with train.tsv and dev.tsv in the GLUE layout."
    )
    hub_name: str | None = Field(
        None, description="For source=hub: dataset id (default 'nyu-mll/glue' with the task as config)."
    )
    hub_config: str | None = Field(None, description="For source=hub: dataset configuration name.")
    train_file: str | None = Field(
        None,
        description="For source=files: CSV, TSV or JSONL training file (gsm8k/alpaca: JSONL, or JSON holding an array of records).",
    )
    eval_file: str | None = Field(
        None,
        description="For source=files: CSV, TSV or JSONL evaluation file; optional for gsm8k/alpaca (then holdout_fraction of the training file is held out).",
    )
    text_column: str = Field("sentence", description="For files/hub data: column with the (first) text.")
    text_pair_column: str | None = Field(
        None, description="For files/hub data: column with the second text of a pair."
    )
    label_column: str = Field("label", description="For files/hub data: column with the label.")
    num_labels: int | None = Field(
        None, ge=1, description="For custom data: number of classes (1 = regression); inferred when omitted."
    )
    max_train_examples: int | None = Field(
        None, gt=0, description="Keep a seeded random subset of the training set of this size."
    )
    max_eval_examples: int | None = Field(None, gt=0, description="Keep the first N evaluation examples.")
    prompt_template: str | None = Field(
        None,
        description="gsm8k/alpaca: Python format string for the prompt, with the record's fields ({question}; {instruction}, {input}); null = the task's default (gsm8k: 'Question: {question}\\nAnswer:'; alpaca: Stanford Alpaca's prompts).",
    )
    holdout_fraction: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="gsm8k/alpaca without an evaluation split (Alpaca from the hub, no eval_file): seeded share of the training data held out for evaluation.",
    )


class PartitionConfig(_Section):
    kind: Literal["iid", "dirichlet", "size"] = Field(
        "iid",
        description="How training examples are split among clients: iid; dirichlet (label skew, Dir(beta) per class); size (quantity skew for data without labels, e.g. gsm8k: client shares of the data drawn from Dir(beta), examples assigned at random).",
    )
    beta: float = Field(
        0.5,
        gt=0,
        description="Dirichlet concentration (over labels for dirichlet, over client sizes for size); smaller is more skewed.",
    )
    min_size: int = Field(8, ge=1, description="Every client gets at least this many examples.")


class FederationConfig(_Section):
    n_clients: int = Field(10, ge=1, description="Clients in the federation.")
    clients_per_round: int | None = Field(None, ge=1, description="Clients sampled per round (default: all).")
    fraction: float | None = Field(
        None, gt=0, le=1, description="Alternative to clients_per_round: fraction of clients sampled."
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
        description="First train only the head for this many rounds (a linear probe), then freeze it and train only the adapter; 0 trains both throughout.",
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
        if self.head_probe_rounds >= self.rounds:
            raise ValueError(
                f"head_probe_rounds ({self.head_probe_rounds}) leaves no round for the adapter (rounds = {self.rounds})"
            )
        return self

    def sampled_per_round(self) -> int:
        """N in the scaling rule: the number of client updates averaged in a round."""
        if self.clients_per_round is not None:
            return self.clients_per_round
        if self.fraction is not None:
            return max(1, round(self.fraction * self.n_clients))
        return self.n_clients


class TrainConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Client optimizer.")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW) or L2 (SGD).")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate decay after warm-up, over each client's total steps."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up, counted in each client's own steps.")
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
        description="Evaluate the personalised models of this many clients only: a sample drawn once from the seed, the same clients at every evaluation so rounds compare (null: every client). Personalised evaluation costs a dev-set pass per client, which dominates large-N runs.",
    )
    max_new_tokens: int = Field(
        256, ge=1, description="gsm8k: tokens generated (greedily) per evaluation answer."
    )
    judged_on: Literal["dev", "local"] = Field(
        "dev",
        description="What a run is judged by (final/best score, collapse): the personalised models on the whole dev set, or under each client's own training label mix (classification; the client-local test data of FedSA-LoRA's protocol, for non-IID splits).",
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
        description="Sound replies a round needs to be averaged; with fewer, the server's tensors stay as they were.",
    )


class SimulatorConfig(_Section):
    """The embedded simulator (sfedlora run without --runtime flower)."""

    workers: int | Literal["auto"] = Field(
        "auto",
        description="Processes that train the round's clients (and evaluate personalised models) side by side, each with one torch thread and the frozen base model shared copy-on-write; the same results as one process, up to float rounding. auto: one per torch thread on a CPU (so 2 on a 2-core machine, 1 inside a sweep running a cell per core), 1 on a GPU; CPU only.",
    )

    @field_validator("workers")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be at least 1 (or auto)")
        return v


class FlowerConfig(_Section):
    """The Flower runtime (``sfedlora run --runtime flower``, ``flwr run .``); the embedded simulator ignores it."""

    round_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds the server waits for a round's replies; clients silent by then count as dropped and the round goes on without them.",
    )
    connect_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds the server waits at the start for one SuperNode per client to connect.",
    )
    client_cpus: float = Field(
        1.0,
        gt=0,
        description="Flower simulation: CPU cores reserved per ClientApp (clients train concurrently as cores allow).",
    )
    client_gpus: float = Field(
        0.0,
        ge=0,
        description="Flower simulation: share of a GPU per ClientApp (0.25 lets four share one); 0 trains clients on the CPU.",
    )


class PrivacyConfig(_Section):
    """Differential privacy and secure aggregation (all off by default); see docs/privacy.md."""

    dp: Literal["none", "client", "server"] = Field(
        "none",
        description="client: DP-SGD on each client (per-example clipping + Gaussian noise; protects each training example); server: the server clips each client's update and adds Gaussian noise to their mean (protects each client's whole data); none: no DP.",
    )
    epsilon: float | None = Field(
        None,
        gt=0,
        description="Target ε over the whole run; the noise multiplier is calibrated to it before the first round. Set this or noise_multiplier.",
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="Noise standard deviation divided by clip_norm, instead of a target ε (ε is then reported, not targeted).",
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="δ of the (ε, δ) guarantee; keep it below 1 / (examples per client) for dp=client, 1 / n_clients for dp=server.",
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        description="L2 bound C: on each example's gradient (dp=client, replacing train.max_grad_norm) or on each client's update (dp=server).",
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp",
        description="Opacus privacy accountant: rdp (Rényi DP) or prv (privacy random variables; tighter, slower).",
    )
    secure_noise: bool = Field(
        False,
        description="Draw DP noise from a generator seeded by the OS instead of the run's seed, so it cannot be replayed from the config (runs are then not repeatable).",
    )
    secagg: bool = Field(
        False,
        description="Flower runtime only: aggregate with Flower's SecAgg+, so the server sees only the sum of the clients' updates.",
    )
    secagg_clipping_range: float = Field(
        8.0,
        gt=0,
        description="SecAgg+: updates are quantised on [-range, range]; entries of a client's change beyond it are clipped.",
    )
    secagg_num_shares: int = Field(
        3, ge=3, description="SecAgg+: clients each client shares its secrets with (Flower's num_shares)."
    )
    secagg_threshold: int = Field(
        2,
        ge=2,
        description="SecAgg+: shares needed to reconstruct a dropped client's mask (Flower's reconstruction_threshold; below secagg_num_shares).",
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
                f"secagg_threshold ({self.secagg_threshold}) must be below secagg_num_shares ({self.secagg_num_shares})"
            )
        return self


class RunConfig(_Section):
    name: str | None = Field(None, description="Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(0, description="Seeds data split, initialisation, sampling and client RNGs.")
    checkpoint_every: int = Field(
        1, ge=1, description="Write a resumable checkpoint every k rounds (removed once the run finishes)."
    )
    save_adapters: bool = Field(
        True,
        description="Save the final adapters in PEFT format (turn off for large sweeps that need only metrics).",
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
                    f"lora.scaling: method {self.method} uses scaling {preset_rule}, not {self.lora.scaling}; "
                    f"use method={PRESETS[self.method][0]} to choose the scaling freely"
                )
        resolved = self.lora.scaling or preset_rule or "lora"
        if self.lora.scaling != resolved:
            self.lora.scaling = resolved
        return self

    @model_validator(mode="after")
    def _reachable_min_replies(self) -> RunConfig:
        sampled = self.federation.sampled_per_round()
        if self.server.min_replies > sampled:
            raise ValueError(
                f"server.min_replies ({self.server.min_replies}) exceeds the {sampled} clients sampled per round: "
                "no round could ever be averaged"
            )
        return self

    @model_validator(mode="after")
    def _eval_clients_exist(self) -> RunConfig:
        if self.eval.clients is not None and self.eval.clients > self.federation.n_clients:
            raise ValueError(
                f"eval.clients ({self.eval.clients}) exceeds federation.n_clients ({self.federation.n_clients}): "
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
        assert self.lora.scaling is not None  # set by _resolve_method
        return self.lora.scaling


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SfedloraError(f"bad override {dotted}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` → (``a.b``, YAML value of ``c``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SfedloraError(f"bad override {text!r}: write it as key=value, e.g. federation.rounds=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key {where!r}; `sfedlora config` lists the valid keys"
    got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
    return f"config {where + ': ' if where else ''}{msg}{got}"


def apply_overrides(tree: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A copy of a raw (unvalidated) config tree with ``key=value`` overrides applied."""
    tree = copy.deepcopy(tree or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree


def build_config(tree: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    tree = apply_overrides(tree, overrides)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise SfedloraError(_format_validation_error(err)) from None


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML config file's top-level mapping, with one-line errors for every way it can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise SfedloraError(
            f"config file {path} not found: pass the path of a YAML file, e.g. examples/sfed-lora.yaml"
        )
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise SfedloraError(f"config file {path} is not valid YAML{line}: fix its syntax") from None
    if not isinstance(tree, dict):
        raise SfedloraError(
            f"config file {path} must hold a mapping of sections (model:, lora:, ...), not a {type(tree).__name__}"
        )
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the defaults: the main job) and apply ``key=value`` overrides."""
    return build_config(read_yaml_mapping(path) if path is not None else {}, overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Keys that name where a run lives or how it is shown, not what it computes.
NON_RESULT_KEYS = frozenset(
    {
        "name",
        "output_dir",
        "checkpoint_every",
        "save_adapters",
        "flower.round_timeout",
        "flower.connect_timeout",
        "flower.client_cpus",
        "flower.client_gpus",
        "simulator.workers",
    }
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def result_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs, leaving out NON_RESULT_KEYS."""
    fa, fb = _flatten(a.model_dump(mode="json")), _flatten(b.model_dump(mode="json"))
    return sorted(k for k in fa.keys() | fb.keys() if k not in NON_RESULT_KEYS and fa.get(k) != fb.get(k))
