"""A tiny randomly initialised LLaMA with a BPE tokenizer trained on the task's own text.

``model.name_or_path: tiny-llama`` runs the causal-LM path on a CPU in seconds: the same
LLaMA code (attention, RMSNorm, rotary positions, gated MLP) as LLaMA-2-7B at 2 layers and
hidden size 64. Nothing is downloaded: the tokenizer is trained with ``tokenizers`` on the
run's training prompts and targets, and the weights are random (seed 0). Both are cached as
a Hugging Face model directory, keyed by a hash of the text and the settings, so every
process of a run (simulator, Flower clients) loads the same model.

Being untrained, its answers are noise: a few rounds of LoRA lower the training loss (the
adapter learns the data's token statistics through the frozen random weights), but GSM8K
accuracy stays near zero. It exercises the code path, not the method.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

TINY_LLAMA = "tiny-llama"

# Small enough to train and generate on 2 CPU cores, large enough for LoRA to matter.
VOCAB_SIZE = 2048
HIDDEN = 64
LAYERS = 2
HEADS = 4
MLP = 172  # about 8/3 x hidden, as in LLaMA
MAX_POSITIONS = 2048
# Fan-in init, std 1/sqrt(hidden): LLaMA's 0.02 is that scale for hidden ~2,500-4,096. At
# hidden 64, 0.02 would leave the frozen output layer able to move a logit by only ~1 nat
# after the final RMSNorm (|logit| <= 0.02 * sqrt(64) * sqrt(64)), so no adapter could take
# the loss much below ln(vocab); at 1/sqrt(64) the adapter has room to learn.
INIT_STD = HIDDEN**-0.5
SPECIALS = ("<unk>", "<s>", "</s>")


def cache_root() -> Path:
    """``$SFEDLORA_CACHE`` or ``~/.cache/sfedlora``."""
    return Path(os.environ.get("SFEDLORA_CACHE", Path.home() / ".cache" / "sfedlora"))


def train_tokenizer(texts: list[str]):
    """A byte-level BPE (digits split one by one, as LLaMA's tokenizer does) with BOS added to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _key(texts: list[str]) -> str:
    h = hashlib.sha256(repr((VOCAB_SIZE, HIDDEN, LAYERS, HEADS, MLP, MAX_POSITIONS, INIT_STD)).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def tiny_llama_config(vocab_size: int = VOCAB_SIZE, bos: int = 1, eos: int = 2):
    """The tiny LLaMA's ``LlamaConfig``; the defaults are the tokenizer's at full size (SPECIALS' ids)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
    )


def tiny_llama_dir(texts: list[str], cache: Path | None = None) -> Path:
    """The model directory of the tiny LLaMA for ``texts``, built on first use."""
    import torch
    from transformers import LlamaForCausalLM

    target = (cache or cache_root()) / f"tiny-llama-{_key(texts)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts)
    config = tiny_llama_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Build beside the target and rename: a process that finds config.json finds a whole model,
    # and two processes building at once leave one complete copy.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process got there first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
