"""What is trained on what: the model, its LoRA adapter, the data and its split."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from ..lora.scaling import ScalingRule


class _Section(BaseModel):
    # No setting means anything at inf or nan: refused at load, not deep inside a run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "minilm",
        description="Hub id or local path of the base model; 'minilm' is the bundled all-MiniLM-L6-v2.",
    )
    target_modules: list[str] | None = Field(
        None,
        description=(
            "Modules that get LoRA; default per architecture (query/value for BERT-like models; q_proj, "
            "k_proj, v_proj, o_proj for LLaMA-like causal LMs)."
        ),
    )
    lora_mlp: bool = Field(
        False,
        description=(
            "Causal LMs: also put LoRA on the MLP projections (LLaMA: gate_proj, up_proj, down_proj) when "
            "target_modules is not set."
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute activations in the backward pass: much less GPU memory for long sequences "
            "(LLaMA-2-7B), for one more forward pass of compute."
        ),
    )
    max_length: int = Field(128, gt=0, description="Tokens per example after truncation.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "Forward-pass precision (torch.autocast); auto = bf16 where the GPU or CPU (AVX512-BF16, AMX) "
            "runs it fast, else fp32; fp16 (GPUs without bf16) adds loss scaling. Adapters and optimizer "
            "state stay fp32; a causal LM's frozen base weights are stored in bf16/fp16 on a GPU."
        ),
    )
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description=(
            "Attention implementation of training and evaluation passes: eager, sdpa (torch's "
            "scaled_dot_product_attention, the transformers default), or auto = chosen per pass by device, "
            "padded length from a measured rule (eager on a CPU below 256 tokens, sdpa "
            "otherwise; benchmarks/README.md, Attention)."
        ),
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description=(
            "Causal LMs: store the frozen base model's linear layers quantized with bitsandbytes (pip "
            "install 'sfedlora[quantization]'): 4bit = NF4 with double quantization (QLoRA), "
            "8bit = LLM.int8; bf16 compute (fp16 with precision=fp16). Adapters and optimizer state "
            "stay fp32. See docs/one-gpu.md."
        ),
    )


class LoraSettings(_Section):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="α in the scaling rule.")
    scaling: ScalingRule | None = Field(
        None,
        description=(
            "lora (α/r), rslora (α/√r), sfed (α·√(N/r)) or power (α·N^a/r^b, with lora.n_exponent = a and "
            "lora.rank_exponent = b); default set by the method preset. See docs/method.md."
        ),
    )
    n_exponent: float | None = Field(
        None,
        description=(
            "With scaling=power: a, the power of N (clients averaged per round) in γ = α·N^a/r^b; "
            "null: 0.5, sfed's."
        ),
    )
    rank_exponent: float | None = Field(
        None,
        description="With scaling=power: b, the power of the rank r in γ = α·N^a/r^b; null: 0.5, sfed's.",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    client_ranks: list[int] | None = Field(
        None,
        description=(
            "Per-client LoRA ranks, cycled over the clients (client k gets entry k mod length), each at "
            "most lora.rank, the rank the server keeps A at; null: every client at lora.rank. See "
            "docs/mixed-ranks.md."
        ),
    )

    @field_validator("n_exponent", "rank_exponent", mode="before")
    @classmethod
    def _exponent_is_a_number(cls, value, info: ValidationInfo):
        # Before pydantic's coercion, which would take true for 1.0 and "0.5" for 0.5.
        if value is None or (
            isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf
        ):
            return value
        symbol = "a" if info.field_name == "n_exponent" else "b"
        raise ValueError(
            f"must be a number >= 0 ({symbol} in γ = α·N^a/r^b): set e.g. lora.{info.field_name}=0.5"
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
        description=(
            "GLUE task name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), a causal-LM task (gsm8k, "
            "alpaca) or any other name for your own classification data."
        ),
    )
    source: Literal["bundled", "tsv", "hub", "files"] = Field(
        "bundled",
        description=(
            "bundled SST-2 sample, GLUE TSV directory, Hugging Face hub, or your own files (gsm8k/alpaca: "
            "JSON or JSONL)."
        ),
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
        description=(
            "For source=files: CSV, TSV or JSONL training file (gsm8k/alpaca: JSONL, or JSON holding an "
            "array of records)."
        ),
    )
    eval_file: str | None = Field(
        None,
        description=(
            "For source=files: CSV, TSV or JSONL evaluation file; optional for gsm8k/alpaca (then "
            "holdout_fraction of the training file is held out)."
        ),
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
        description=(
            "gsm8k/alpaca: Python format string for the prompt, with the record's fields ({question}; "
            "{instruction}, {input}); null = the task's default (gsm8k: 'Question: {question}\\nAnswer:'; "
            "alpaca: Stanford Alpaca's prompts)."
        ),
    )
    holdout_fraction: float = Field(
        0.05,
        gt=0,
        lt=1,
        description=(
            "gsm8k/alpaca without an evaluation split (Alpaca from the hub, no eval_file): seeded share of "
            "the training data held out for evaluation."
        ),
    )


class PartitionConfig(_Section):
    kind: Literal["iid", "dirichlet", "size"] = Field(
        "iid",
        description=(
            "How training examples are split among clients: iid; dirichlet (label skew, Dir(beta) per "
            "class); size (quantity skew for data without labels, e.g. gsm8k: client shares of the data "
            "drawn from Dir(beta), examples assigned at random)."
        ),
    )
    beta: float = Field(
        0.5,
        gt=0,
        description=(
            "Dirichlet concentration (over labels for dirichlet, over client sizes for size); smaller is "
            "more skewed."
        ),
    )
    min_size: int = Field(8, ge=1, description="Every client gets at least this many examples.")
