"""sfedlora: stable federated fine-tuning of language models with LoRA (SFed-LoRA)."""

from .config import RunConfig, load_config
from .driver.experiment import run
from .federated.methods import METHODS, PRESETS, aggregate, get_method
from .lora.scaling import gamma

__version__ = "0.1.0"
__all__ = [
    "RunConfig",
    "load_config",
    "run",
    "METHODS",
    "PRESETS",
    "aggregate",
    "get_method",
    "gamma",
    "__version__",
]
