"""``python -m sfedlora.cli``: the same command as ``sfedlora``."""

from .main import app

app()
