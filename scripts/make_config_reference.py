"""Regenerate docs/config-reference.md from the config models."""

from pathlib import Path

from sfedlora.config.reference import render

path = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"
path.parent.mkdir(exist_ok=True)
path.write_text(render())
print(f"wrote {path}")
