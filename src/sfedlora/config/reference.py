"""The config reference in Markdown, generated from the pydantic models in :mod:`config`.

``python scripts/make_config_reference.py`` writes it to ``docs/config-reference.md``; a
test fails when the committed file no longer matches the models.
"""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel

from . import RunConfig

HEADER = """# Config reference

Every key of a run config, generated from the pydantic models in `src/sfedlora/config/`
by `python scripts/make_config_reference.py` (do not edit by hand). Set keys in a YAML file
(sections as mappings) or on the command line with `--set section.key=value`; `sfedlora
config [FILE] [--set ...]` prints the fully resolved config.
"""


def _type_name(annotation) -> str:
    """``int``, ``list[str]``, choices as ``a \\| b``; ``None`` in a union as ``null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("`null`" if a is type(None) else _type_name(a) for a in args)
    if origin is None:
        return f"`{annotation.__name__}`"
    return f"`{origin.__name__}[{', '.join(a.__name__ for a in args)}]`"


def _default(value) -> str:
    return f"`{json.dumps(value.model_dump(mode='json') if isinstance(value, BaseModel) else value)}`"


def _table(model: type[BaseModel], prefix: str) -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    sections = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((f"{prefix}{name}", annotation))
            continue
        description = (field.description or "").replace("|", "\\|").replace("<", "&lt;")
        rows.append(
            f"| `{prefix}{name}` | {_type_name(annotation)} | {_default(field.default)} | {description} |"
        )
    return rows, sections


def render() -> str:
    """The whole reference: top-level keys, then one table per section."""
    rows, sections = _table(RunConfig, "")
    out = [HEADER, "## Top level", "", *rows, ""]
    for name, model in sections:
        doc = (model.__doc__ or "").strip()
        out += [f"## `{name}`", ""] + ([doc, ""] if doc else [])
        section_rows, _ = _table(model, f"{name}.")
        out += [*section_rows, ""]
    return "\n".join(out)
