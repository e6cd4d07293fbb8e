"""Configs from YAML files and ``--set a.b=c`` overrides; what two configs differ in."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import SfedloraError
from .run import RunConfig


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SfedloraError(f"bad override {dotted}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` → (``a.b``, YAML value of ``c``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SfedloraError(f"bad override {text!r}: write it as key=value, e.g. federation.rounds=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "finite_number":
        msg = "must be a finite number, not inf or nan; `sfedlora config` shows its default"
    if first["type"] == "extra_forbidden":
        return f"unknown config key {where!r}; `sfedlora config` lists the valid keys"
    got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
    return f"config {where + ': ' if where else ''}{msg}{got}"


def apply_overrides(tree: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A copy of a raw (unvalidated) config tree with ``key=value`` overrides applied."""
    tree = copy.deepcopy(tree or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree


def build_config(tree: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    tree = apply_overrides(tree, overrides)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise SfedloraError(_format_validation_error(err)) from None


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML config file's top-level mapping, with one-line errors for every way it can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise SfedloraError(
            f"config file {path} not found: pass the path of a YAML file, e.g. examples/sfed-lora.yaml"
        )
    try:
        tree = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise SfedloraError(
            f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
            f"{err.start}): save it as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise SfedloraError(f"config file {path} is not valid YAML{line}: fix its syntax") from None
    if not isinstance(tree, dict):
        raise SfedloraError(
            f"config file {path} must hold a mapping of sections (model:, lora:, ...), "
            f"not a {type(tree).__name__}"
        )
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the defaults: the main job) and apply ``key=value`` overrides."""
    return build_config(read_yaml_mapping(path) if path is not None else {}, overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Keys that name where a run lives or how it is shown, not what it computes.
NON_RESULT_KEYS = frozenset(
    {
        "name",
        "output_dir",
        "checkpoint_every",
        "save_adapters",
        "report_to",
        "flower.round_timeout",
        "flower.connect_timeout",
        "flower.client_cpus",
        "flower.client_gpus",
        "flower.collect_adapters",
        "simulator.workers",
    }
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def result_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs, leaving out NON_RESULT_KEYS."""
    fa, fb = _flatten(a.model_dump(mode="json")), _flatten(b.model_dump(mode="json"))
    return sorted(k for k in fa.keys() | fb.keys() if k not in NON_RESULT_KEYS and fa.get(k) != fb.get(k))
