"""Causal-LM evaluation: batched greedy generation, answer perplexity.

GSM8K is scored by exact match of the final number (:mod:`sfedlora.data.answers`). Alpaca-style
data is scored by the perplexity of the
held-out responses (prompt tokens carry no loss, as in training).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.answers import exact_match
from ..data.encoding import length_batches
from ..lora.attention import use_attention
from ..lora.models import Compute


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    tokenizer,
    batch_size: int,
    max_new_tokens: int,
    compute: Compute = Compute(),
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded, in the prompts' order.

    Batches of similar length are left-padded so that every prompt ends where generation
    starts; the attention mask keeps padding out of attention and position ids.
    """
    from transformers import GenerationConfig

    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    out: list[str] = [""] * len(prompts)
    for idx in length_batches(np.array([len(p) for p in prompts]), batch_size):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        use_attention(model, compute.attention, compute.device, width + max_new_tokens)
        with compute.autocast():
            generated = model.generate(
                input_ids=ids.to(compute.device),
                attention_mask=mask.to(compute.device),
                generation_config=config,
            )
        for i, row in zip(idx, generated[:, width:].tolist()):
            if eos in row:
                row = row[: row.index(eos)]
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


@torch.no_grad()
def answer_nll(model, data, tokenizer, batch_size: int, compute: Compute = Compute()) -> tuple[float, int]:
    """Summed negative log-likelihood of the answer tokens of ``data`` (an LMEncoded), and their count."""
    model.eval()
    total, count = 0.0, 0
    for idx in length_batches(data.lengths(), batch_size):
        batch = data.collate(idx, tokenizer)
        labels = batch.pop("labels").to(compute.device)
        logits = compute.forward(model, batch).logits.float()
        # Token t predicts token t+1: drop the last logit and the first label.
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        )
        count += int((labels[:, 1:] != -100).sum())
    return total, count


def lm_scores(
    model, data, tokenizer, batch_size: int, max_new_tokens: int, compute: Compute = Compute()
) -> dict[str, float]:
    """Answer loss and perplexity on ``data``; with reference numbers (GSM8K) also exact-match accuracy."""
    total, count = answer_nll(model, data, tokenizer, batch_size, compute)
    loss = total / max(count, 1)
    scores = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
    if any(r is not None for r in data.references):
        predictions = generate(model, data.prompts(), tokenizer, batch_size, max_new_tokens, compute)
        scores["accuracy"] = exact_match(predictions, data.references)
    return scores
