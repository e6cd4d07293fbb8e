"""SFed-LoRA's scaling in any PEFT pipeline: a ``LoraConfig`` that realises a scaling rule, and
the check that a model's LoRA layers do.

Every LoRA model this project builds goes through :func:`lora_config` and :func:`check_model`
(``lora.models``), so a pipeline that uses them gets the γ a ``sfedlora run`` trains with::

    from peft import get_peft_model
    from sfedlora.peft import check_model, lora_config

    config = lora_config(rank=16, alpha=16, n_clients=10, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base_model, config)  # every layer: γ = 16·√(10/16)
    check_model(model, alpha=16, n_clients=10)  # raises if a layer computes another γ

N is the number of client updates the server averages in a round (the clients sampled per
round), not the size of the federation. The rule is a name of :mod:`sfedlora.lora.scaling`:
``sfed`` (α·√(N/r), the default), ``lora`` (α/r), ``rslora`` (α/√r) or ``power(a=…, b=…)``.
"""

from __future__ import annotations

from .lora.scaling import gamma, peft_gamma, peft_scaling_kwargs, realises

# Set by lora_config from the rule; a caller's own value would silently change γ.
_SCALING_ARGS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def lora_config(rank: int, alpha: float, n_clients: float = 1, rule: str = "sfed", **lora_kwargs):
    """A ``peft.LoraConfig`` of rank ``rank`` whose layers compute γ = ``gamma(rule, alpha, rank,
    n_clients)``; ``lora_kwargs`` (``target_modules``, ``task_type``, ``lora_dropout``, …) go to
    ``LoraConfig`` unchanged."""
    from peft import LoraConfig

    fixed = sorted(set(lora_kwargs) & set(_SCALING_ARGS))
    if fixed:
        raise TypeError(
            f"lora_config sets {', '.join(fixed)} from the scaling rule; pass rank, alpha, n_clients and rule"
        )
    return LoraConfig(r=rank, **peft_scaling_kwargs(rule, alpha, rank, n_clients), **lora_kwargs)


def config_gamma(config) -> float:
    """The γ the layers of a ``LoraConfig`` compute (without ``rank_pattern`` or ``alpha_pattern``)."""
    return peft_gamma({"lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora}, config.r)


def layer_gammas(model, adapter: str = "default") -> dict[str, float]:
    """The γ each LoRA layer of ``model`` multiplies ``B A x`` by, by module name."""
    from peft.tuners.lora import LoraLayer

    return {
        name: m.scaling[adapter]
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter in m.scaling
    }


def check_model(
    model, alpha: float, n_clients: float = 1, rule: str = "sfed", adapter: str = "default"
) -> dict[str, float]:
    """Raise ``ValueError`` unless every LoRA layer of ``model`` computes the rule's γ at its own
    rank (up to float rounding); return each layer's γ. A model without LoRA layers fails too."""
    from peft.tuners.lora import LoraLayer

    ranks = {
        name: m.r[adapter] for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.r
    }
    if not ranks:
        raise ValueError(f"the model has no LoRA layers with adapter {adapter!r}")
    gammas = layer_gammas(model, adapter)
    for name, value in gammas.items():
        if not realises(rule, alpha, ranks[name], n_clients, value):
            raise ValueError(
                f"LoRA layer {name} (r={ranks[name]}) computes γ={value}, the {rule} rule gives "
                f"γ={gamma(rule, alpha, ranks[name], n_clients)} at α={alpha}, N={n_clients}: "
                "build its LoraConfig with sfedlora.peft.lora_config"
            )
    return gammas
