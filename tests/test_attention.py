"""model.attention: the measured rule; switching implementation between passes keeps the outputs."""

import dataclasses

import torch

from sfedlora.lora.attention import EAGER_BELOW, choose_attention
from sfedlora.lora.models import Compute, build_classifier


def test_auto_picks_eager_for_short_cpu_passes_and_sdpa_otherwise():
    short, long = EAGER_BELOW - 1, EAGER_BELOW
    assert choose_attention("auto", "cpu", short) == "eager"
    assert choose_attention("auto", "cpu", long) == "sdpa"
    assert choose_attention("auto", "cuda:0", 8) == "sdpa"
    assert choose_attention("sdpa", "cpu", 8) == "sdpa"  # an explicit setting is kept
    assert choose_attention("eager", "cuda", 4096) == "eager"


def test_eager_and_sdpa_passes_give_the_same_logits():
    model, tok = build_classifier("minilm", 2, 4, 16.0, "sfed", 2)
    model.eval()
    batch = dict(
        tok(
            ["a fine film", "dull, long and far too loud for its own good"], padding=True, return_tensors="pt"
        )
    )
    out = {}
    for impl in ("sdpa", "eager", "sdpa"):
        compute = dataclasses.replace(Compute(), attention=impl)
        with torch.no_grad():
            out[impl] = compute.forward(model, batch).logits
        assert model.get_base_model().config._attn_implementation == impl
    torch.testing.assert_close(out["eager"], out["sdpa"], rtol=1e-4, atol=1e-5)
