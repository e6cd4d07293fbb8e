"""flowertune-sfed: the model, its LoRA adapter at SFed-LoRA's scaling, the learning-rate schedule."""

import math

import torch
from omegaconf import DictConfig
from peft import get_peft_model
from peft.utils import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from sfedlora.peft import check_model, lora_config


def cosine_annealing(
    current_round: int,
    total_round: int,
    lrate_max: float = 0.001,
    lrate_min: float = 0.0,
) -> float:
    """Implement cosine annealing learning rate schedule."""
    cos_inner = math.pi * current_round / total_round
    return lrate_min + 0.5 * (lrate_max - lrate_min) * (1 + math.cos(cos_inner))


def get_model(model_cfg: DictConfig, n_clients: int):
    """The base model with a LoRA adapter whose layers compute γ of ``model_cfg.lora.scaling`` for
    ``n_clients`` updates averaged per round (checked layer by layer)."""
    quantized = model_cfg.quantization in (4, 8)
    if model_cfg.quantization == 4:
        quantization_config = BitsAndBytesConfig(load_in_4bit=True)
    elif model_cfg.quantization == 8:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    elif model_cfg.quantization == 0:
        quantization_config = None
    else:
        raise ValueError(
            f"Use 4-bit or 8-bit quantization, or 0 for none. You passed: {model_cfg.quantization}"
        )

    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.name,
        quantization_config=quantization_config,
        dtype=torch.bfloat16 if quantized else torch.float32,
        low_cpu_mem_usage=True,
    )

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_cfg.gradient_checkpointing
        )

    lora = model_cfg.lora
    peft_config = lora_config(
        rank=lora.peft_lora_r,
        alpha=lora.peft_lora_alpha,
        n_clients=n_clients,
        rule=lora.scaling,
        lora_dropout=0.075,
        task_type="CAUSAL_LM",
    )

    if model_cfg.gradient_checkpointing:
        model.config.use_cache = False

    model = get_peft_model(model, peft_config)
    check_model(model, lora.peft_lora_alpha, n_clients, lora.scaling)
    return model
