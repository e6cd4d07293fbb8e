"""What our commands print: library chatter turned down so progress lines stay readable."""

from __future__ import annotations

import warnings


def quiet_libraries() -> None:
    """Silence per-layer load reports and progress bars of transformers and datasets.

    Called by the CLI and by every sweep worker process (spawned workers start with the
    libraries' defaults again).
    """
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # Raised by transformers when PEFT builds the model; nothing a user of ours can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
