"""Causal language modelling (GSM8K, Alpaca): no head; loss on answer tokens; generation-based scores."""

from __future__ import annotations

from ..config import EvalConfig, RunConfig
from ..data import TaskData
from ..data.examples import CAUSAL_LM
from ..data.lm import LMEncoded, encode_lm
from ..lm_eval import lm_scores
from ..models import Compute, build_causal_lm
from ..tiny_llama import TINY_LLAMA, tiny_llama_dir
from .base import Task, register


@register
class CausalLM(Task):
    kind = CAUSAL_LM
    has_head = False
    has_labels = False

    def build_model(self, cfg: RunConfig, compute: Compute, n_sampled: int, data: TaskData):
        m, lora = cfg.model, cfg.lora
        name = m.name_or_path
        if name == TINY_LLAMA:  # the CPU demo's model, with a tokenizer trained on the run's own text
            name = str(tiny_llama_dir(data.train.prompts + data.train.targets))
        return build_causal_lm(
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
        )

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
