"""The generated config reference stays in step with the config models."""

from pathlib import Path

from pydantic import BaseModel

from sfedlora.config import RunConfig
from sfedlora.config_reference import render

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"


def test_config_reference_is_current():
    assert REFERENCE.read_text() == render(), "docs/config-reference.md is stale: run python scripts/make_config_reference.py"


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_config_key_is_documented():
    keys = dict(_fields(RunConfig))
    assert "federation.n_clients" in keys and "train.lr" in keys
    undocumented = [k for k, f in keys.items() if not f.description]
    assert not undocumented, f"config keys without a description: {undocumented}"
    text = render()
    assert all(f"`{k}`" in text for k in keys)
