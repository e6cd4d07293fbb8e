"""Causal language modelling (GSM8K, Alpaca): no head; loss on answer tokens; generation-based scores."""

from __future__ import annotations

import torch

from ..config import EvalConfig, RunConfig
from ..data import TaskData
from ..data.examples import CAUSAL_LM
from ..data.lm import IGNORE, LMEncoded, encode_lm
from ..errors import SfedloraError
from ..lora.models import Compute, build_causal_lm
from ..lora.tiny_llama import TINY_LLAMA, tiny_llama_dir
from .base import Task, register
from .lm_eval import lm_scores


def quantization_kwargs(quantization: str, compute: Compute) -> dict:
    """``from_pretrained``'s arguments for a base stored in 4 bits (NF4, double quantization: QLoRA's
    choice) or 8 (LLM.int8), computing in bf16 (fp16 where the run is fp16), loaded onto the run's
    device at once; {} for ``none``."""
    if quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    half = torch.float16 if compute.precision == "fp16" else torch.bfloat16
    if quantization == "8bit":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=half,
        )
    return {"quantization_config": bnb, "device_map": {"": compute.device}}


@register
class CausalLM(Task):
    kind = CAUSAL_LM
    pipeline_tag = "text-generation"
    auto_class = "AutoModelForCausalLM"
    has_head = False
    has_labels = False
    quantizes = True

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        q = cfg.model.quantization
        if q == "none":
            return
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SfedloraError(
                f"model.quantization={q} needs bitsandbytes: pip install 'sfedlora[quantization]' "
                "(or set model.quantization=none)"
            ) from None

    def build_model(self, cfg: RunConfig, compute: Compute, n_sampled: int, data: TaskData):
        m, lora = cfg.model, cfg.lora
        name = m.name_or_path
        if name == TINY_LLAMA:  # the CPU demo's model, with a tokenizer trained on the run's own text
            name = str(tiny_llama_dir(data.train.prompts + data.train.targets))
        model, tokenizer = build_causal_lm(
            name,
            lora.rank,
            lora.alpha,
            cfg.scaling,
            n_sampled,
            dropout=lora.dropout,
            target_modules=m.target_modules,
            lora_mlp=m.lora_mlp,
            dtype=compute.base_dtype,
            seed=cfg.seed,
            load_kwargs=quantization_kwargs(m.quantization, compute),
        )
        for module in model.modules():
            # bitsandbytes (0.50) repacks a 4-bit layer for its AVX512-BF16 CPU kernel in blocks of 32
            # output rows and whole quantization blocks per row, and fails on other shapes (the tiny
            # LLaMA's MLP, 172 wide): those layers take its generic path.
            if getattr(module, "support_avx512bf16_for_cpu", False) and (
                module.out_features % 32 or module.in_features % module.weight.quant_state.blocksize
            ):
                module.support_avx512bf16_for_cpu = False
        return model, tokenizer

    def loss(self, model, batch: dict[str, torch.Tensor], compute: Compute, per_example: bool = False):
        """The mean over the batch's answer tokens (as the model computes it); with
        ``per_example``, the mean over examples of each example's own token mean, so that an
        example's gradient does not depend on how many tokens the others have."""
        if not per_example:
            return super().loss(model, batch, compute)
        labels = batch["labels"].to(compute.device)
        logits = compute.forward(model, {k: v for k, v in batch.items() if k != "labels"}).logits
        return self.row_losses(logits, labels, per_example=True).mean()

    def row_counts(self, labels: torch.Tensor, per_example: bool = False) -> torch.Tensor:
        if per_example:
            return super().row_counts(labels)
        return (labels[:, 1:] != IGNORE).sum(1).float()  # the answer tokens: token t predicts t + 1

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor, per_example: bool = False):
        """Token losses summed per row; with ``per_example``, each row's own token mean, so that
        an example's gradient does not depend on how many tokens the others have."""
        # Token t predicts token t+1: drop the last logit and the first label.
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        ).sum(1)
        return nll / (targets != IGNORE).sum(1).clamp(min=1) if per_example else nll

    def encode(self, examples, tokenizer, max_length: int, split: str) -> LMEncoded:
        return encode_lm(examples, tokenizer, max_length, split)

    def outputs(
        self, model, data: LMEncoded, tokenizer, cfg: EvalConfig, compute: Compute
    ) -> dict[str, float]:
        """The scores themselves (loss, perplexity and, for GSM8K, exact match of greedy
        answers): they need the model, so they are computed here."""
        return lm_scores(model, data, tokenizer, cfg.batch_size, cfg.max_new_tokens, compute)

    def scores(self, outputs: dict[str, float], data: LMEncoded) -> dict[str, float]:
        return dict(outputs)

    def trivial_train_loss(self, parts: list[LMEncoded] | None, histograms, initial) -> float | None:
        """The answer-token loss of the model before training on up to 256 training examples
        taken evenly from the clients (the model is the same for every client); no answers are
        generated for it."""
        if parts is None:
            return None
        per_client = -(-256 // len(parts))
        sample = LMEncoded.concat([p.subset(range(min(per_client, len(p)))) for p in parts])
        sample.references = [None] * len(sample)
        return initial(sample)["loss"]

    def judged_metric(self, judged_on: str) -> str:
        """Perplexity, whatever the headline: a causal LM that learns lowers it long before
        exact match of generated answers moves, so it separates learning from not."""
        return "perplexity"
