"""The docs stay in step with the code: the generated config reference, the links."""

import re
from pathlib import Path

from pydantic import BaseModel

from sfedlora.config import RunConfig
from sfedlora.config.reference import render

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"


def test_config_reference_is_current():
    assert REFERENCE.read_text() == render(), (
        "docs/config-reference.md is stale: run python scripts/make_config_reference.py"
    )


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


def test_relative_links_in_the_docs_resolve():
    """A link to a file of the repository that was moved or never written is a dead end."""
    root = Path(__file__).resolve().parents[1]
    broken = []
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(root)} -> {target}")
    assert not broken, broken
