"""The one exception type the CLI turns into a one-line message and exit code 2, and how a
failure to read back a file the program wrote becomes one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SfedloraError(Exception):
    """A problem with the user's input (config, data, model path, run directory)."""


@contextmanager
def reading(path: str | Path, what: str, fix: str) -> Iterator[None]:
    """Decode ``path``, a file sfedlora wrote (``what``: its kind, as the message names it).

    Whatever goes wrong inside means the file is damaged, truncated or from another version
    (each decoder raises its own types: json, YAML, zip, pickle, safetensors, a missing key),
    so any exception becomes one line naming the file and ``fix``. Wrap only the decoding,
    nothing that computes.
    """
    try:
        yield
    except SfedloraError:
        raise
    except Exception as err:
        raise SfedloraError(
            f"{what} {path} is damaged, truncated or from another version ({type(err).__name__}): {fix}"
        ) from None
